"""VL-T5 (Cho et al., 2021): T5 whose encoder reads `[text embeddings ; visual embeddings]`, ready for DePT.

    V = LayerNorm(Linear(feat_dim -> d)(features) + Linear(5 -> d)(x1, y1, x2, y2, area) + image_embedding[image])
    encoder input = [E ; V]         mask = [text mask ; region mask (ones by default)]

T5's relative position bias is applied among the text tokens only and is zero wherever a region is involved,
as in VL-T5: regions have no position, so padding on either side never changes the output. The decoder is
T5's own. DePT touches the text only: `DePTModelForSeq2SeqLM` puts P in front of the text embeddings and adds
A @ B at the text positions, and the visual inputs pass through it as keyword arguments.

    >>> from transformers import T5Config
    >>> t5_config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
    ...                      decoder_start_token_id=0)
    >>> config = VLT5Config.from_t5_config(t5_config, feat_dim=16)
    >>> model = VLT5ForConditionalGeneration(config)
    >>> out = model(input_ids=torch.tensor([[5, 6, 1]]), vis_feats=torch.randn(1, 4, 16),
    ...             vis_boxes=torch.tensor([[[0.0, 0.0, 0.5, 0.5]] * 4]), labels=torch.tensor([[7, 1]]))
    >>> tuple(out.encoder_last_hidden_state.shape)  # 3 text tokens + 4 regions
    (1, 7, 32)

Real runs load a T5 checkpoint: `VLT5ForConditionalGeneration.from_pretrained("t5-base", feat_dim=2048)`;
the visual layers start fresh from `visual_init_seed`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.t5.modeling_t5 import T5LayerNorm, T5Stack
from transformers.utils.output_capturing import capture_outputs

from dept import DePTConfig, DePTModelForSeq2SeqLM, get_dept_model
from dept.methods import LoraSettings, prepare_model

logger = logging.getLogger(__name__)

VISUAL_MODULE = "visual_embedding"
BOX_DIM = 5  # x1, y1, x2, y2, area


@strict
class VLT5Config(T5Config):
    """T5's config plus the visual input.

    Args:
        feat_dim: size of one region feature (2048 for VL-T5's Faster R-CNN features).
        n_images: images per example the model can tell apart (2 for NLVR2; VL-T5 uses 2).
        individual_vis_layer_norm: False (the default): one T5 LayerNorm after summing the feature, box and image
            embeddings. True: VL-T5's released default, a LayerNorm on the feature and on the box projection each,
            then the sum.
        visual_init_seed: seed of the visual layers' initialisation, so frozen visual layers are the same on every
            load of the same base model.
    """

    model_type = "vlt5"

    feat_dim: int = 2048
    n_images: int = 2
    individual_vis_layer_norm: bool = False
    visual_init_seed: int = 0

    @classmethod
    def from_t5_config(cls, t5_config: T5Config, **visual) -> VLT5Config:
        """A VL-T5 config with the text model of `t5_config` and the visual fields given as keywords."""
        text = {key: value for key, value in t5_config.to_dict().items() if key != "model_type"}
        return cls.from_dict({**text, **visual})

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == T5Config.model_type:  # a T5 checkpoint is where VL-T5 starts
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs


class VisualEmbedding(nn.Module):
    """Region features and boxes -> d-dimensional visual tokens.

    Shapes:
        vis_feats: (batch, regions, feat_dim), or (batch, images, regions, feat_dim) for several images per
            example (NLVR2), which are flattened to (batch, images * regions) with each region's image id.
        vis_boxes: the same leading shape with 4 last: (x1, y1, x2, y2), normalised to [0, 1].
        image_ids: optional (batch, regions) or (regions,) image index of each region; 0 by default.
        returns (batch, regions, d).

    VL-T5 also adds region-order embeddings (rows of the word embeddings); they are left out, so the regions are
    a set: their order changes nothing.
    """

    def __init__(self, config: VLT5Config):
        super().__init__()
        d = config.d_model
        self.feat_dim = config.feat_dim
        self.n_images = config.n_images
        self.feat_embedding = nn.Linear(config.feat_dim, d)
        self.box_embedding = nn.Linear(BOX_DIM, d)
        self.image_embedding = nn.Embedding(config.n_images, d)
        self.individual_layer_norm = config.individual_vis_layer_norm
        if self.individual_layer_norm:
            self.feat_layer_norm = T5LayerNorm(d, eps=config.layer_norm_epsilon)
            self.box_layer_norm = T5LayerNorm(d, eps=config.layer_norm_epsilon)
        else:
            self.layer_norm = T5LayerNorm(d, eps=config.layer_norm_epsilon)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """torch's defaults (what VL-T5's layers got), drawn from a seeded CPU generator so every device agrees.

        Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias; image embedding: N(0, 1); norms: 1.
        `transformers.initialization` leaves tensors loaded from a checkpoint untouched.
        """
        generator = torch.Generator().manual_seed(seed)
        for linear in (self.feat_embedding, self.box_embedding):
            bound = linear.in_features**-0.5
            for param in (linear.weight, linear.bias):
                init.copy_(param, torch.empty(param.shape).uniform_(-bound, bound, generator=generator))
        init.copy_(self.image_embedding.weight, torch.randn(self.image_embedding.weight.shape, generator=generator))
        for module in self.modules():
            if isinstance(module, T5LayerNorm):
                init.ones_(module.weight)

    def forward(self, vis_feats: torch.Tensor, vis_boxes: torch.Tensor, image_ids: torch.Tensor | None = None):
        vis_feats, vis_boxes, image_ids = self._flatten_images(vis_feats, vis_boxes, image_ids)
        x1, y1, x2, y2 = vis_boxes.unbind(-1)
        # VL-T5's get_area reads the boxes as (x1, x2, y1, y2) while its loaders store (x1, y1, x2, y2);
        # this is the true area.
        boxes = torch.cat([vis_boxes, ((x2 - x1) * (y2 - y1)).unsqueeze(-1)], dim=-1)
        dtype = self.feat_embedding.weight.dtype
        feat, box = self.feat_embedding(vis_feats.to(dtype)), self.box_embedding(boxes.to(dtype))
        image = self.image_embedding(image_ids)
        if self.individual_layer_norm:
            return self.feat_layer_norm(feat) + self.box_layer_norm(box) + image
        return self.layer_norm(feat + box + image)

    def _flatten_images(self, vis_feats, vis_boxes, image_ids):
        if vis_boxes is None:
            raise ValueError("vis_feats need vis_boxes: (x1, y1, x2, y2) per region, normalised to [0, 1].")
        if vis_feats.dim() not in (3, 4) or vis_feats.shape[-1] != self.feat_dim:
            raise ValueError(
                f"vis_feats must be (batch, regions, {self.feat_dim}) or (batch, images, regions, {self.feat_dim}), "
                f"got {tuple(vis_feats.shape)}. If your features have another size, build the model with "
                f"feat_dim={vis_feats.shape[-1]}."
            )
        if tuple(vis_boxes.shape) != (*vis_feats.shape[:-1], 4):
            raise ValueError(
                f"vis_boxes must be {(*vis_feats.shape[:-1], 4)} (x1, y1, x2, y2 per region) to match vis_feats "
                f"{tuple(vis_feats.shape)}, got {tuple(vis_boxes.shape)}."
            )
        if vis_feats.dim() == 4:
            batch, images, regions, _ = vis_feats.shape
            if images > self.n_images:
                raise ValueError(
                    f"vis_feats hold {images} images per example but the model tells apart n_images="
                    f"{self.n_images}: build it with n_images={images}."
                )
            if image_ids is None:
                image_ids = torch.arange(images, device=vis_feats.device).repeat_interleave(regions)
            vis_feats, vis_boxes = vis_feats.flatten(1, 2), vis_boxes.flatten(1, 2)
        if image_ids is None:
            image_ids = torch.zeros(vis_feats.shape[1], dtype=torch.long, device=vis_feats.device)
        return vis_feats, vis_boxes, image_ids.expand(vis_feats.shape[:2])


def joint_attention_mask(text_mask: torch.Tensor, n_regions: int, vis_attention_mask: torch.Tensor | None = None):
    """`[text mask ; region mask]`, (batch, text + regions); the region mask is all ones unless given."""
    batch = text_mask.shape[0]
    if vis_attention_mask is None:
        return torch.cat([text_mask, text_mask.new_ones(batch, n_regions)], dim=1)
    vis_attention_mask = vis_attention_mask.flatten(1)  # (batch, images, regions) -> (batch, images * regions)
    if tuple(vis_attention_mask.shape) != (batch, n_regions):
        raise ValueError(
            f"vis_attention_mask has shape {tuple(vis_attention_mask.shape)} once flattened, but there are "
            f"{n_regions} regions for a batch of {batch}: it needs one 0/1 entry per region."
        )
    return torch.cat([text_mask, vis_attention_mask.to(text_mask.dtype)], dim=1)


class JointEncoder(T5Stack):
    """T5's encoder over `[text ; regions]`: the same blocks and parameter names, plus the visual embedding.

    Shapes: text (batch, text_length) ids or (batch, text_length, d) embeddings; visual inputs as in
    `VisualEmbedding`. Returns hidden states (batch, text_length + regions, d).
    """

    def __init__(self, config: VLT5Config):
        super().__init__(config)
        self.visual_embedding = VisualEmbedding(config)
        self.post_init()  # initialises the new layers only: T5's are already marked as initialised

    @classmethod
    def is_custom_code(cls) -> bool:
        return False  # _init_weights uses transformers.initialization, so HF may init module by module as for T5

    def _init_weights(self, module):
        if isinstance(module, VisualEmbedding):
            module.reset_parameters(self.config.visual_init_seed)
        else:
            super()._init_weights(module)

    @capture_outputs
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        vis_feats=None,
        vis_boxes=None,
        vis_attention_mask=None,
        image_ids=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, text_length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, text_length, dtype=torch.long, device=inputs_embeds.device)
        if vis_feats is not None:
            if vis_feats.shape[0] != batch:
                raise ValueError(f"vis_feats are for {vis_feats.shape[0]} examples but the text for {batch}.")
            vis_embeds = self.visual_embedding(vis_feats, vis_boxes, image_ids).to(inputs_embeds.dtype)
            attention_mask = joint_attention_mask(attention_mask, vis_embeds.shape[1], vis_attention_mask)
            inputs_embeds = torch.cat([inputs_embeds, vis_embeds], dim=1)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        position_bias = self.text_position_bias(text_length, inputs_embeds.shape[1] - text_length)

        hidden_states = self.dropout(inputs_embeds)
        for block in self.block:
            hidden_states, _, _ = block(hidden_states, mask, position_bias, **kwargs)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        return BaseModelOutput(last_hidden_state=hidden_states)

    def text_position_bias(self, text_length: int, n_regions: int) -> torch.Tensor:
        """(1, heads, text + regions, text + regions): T5's relative bias among text, 0 where a region is involved."""
        text_bias = self.block[0].layer[0].SelfAttention.compute_bias(text_length, text_length)
        return F.pad(text_bias, (0, n_regions, 0, n_regions))


class VLT5ForConditionalGeneration(T5ForConditionalGeneration):
    """T5 with `JointEncoder`: forward and generate take the visual inputs next to the text.

    `forward(input_ids | inputs_embeds, attention_mask, vis_feats, vis_boxes, vis_attention_mask, image_ids,
    labels, ...)`; `generate` takes the same inputs and hands the visual ones to the encoder (beam search
    expands them with the rest).
    """

    config_class = VLT5Config

    @classmethod
    def is_custom_code(cls) -> bool:
        return False  # see JointEncoder.is_custom_code

    def __init__(self, config: VLT5Config):
        super().__init__(config)
        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        encoder_config.use_cache = False
        self.encoder = JointEncoder(encoder_config)  # replaces T5's encoder; the same keys plus visual_embedding
        self.post_init()

    @property
    def visual_embedding(self) -> VisualEmbedding:
        return self.encoder.visual_embedding

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        vis_feats=None,
        vis_boxes=None,
        vis_attention_mask=None,
        image_ids=None,
        encoder_outputs=None,
        **kwargs,
    ):
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                vis_feats=vis_feats,
                vis_boxes=vis_boxes,
                vis_attention_mask=vis_attention_mask,
                image_ids=image_ids,
                **{k: kwargs[k] for k in ("output_attentions", "output_hidden_states") if k in kwargs},
            )
        hidden_states = encoder_outputs[0]
        if attention_mask is None and vis_attention_mask is not None:  # all text is real
            text_length = hidden_states.shape[1] - vis_attention_mask.flatten(1).shape[1]
            attention_mask = torch.ones(hidden_states.shape[0], text_length, dtype=torch.long, device=hidden_states.device)
        if attention_mask is not None:  # the decoder attends to the regions too
            n_regions = hidden_states.shape[1] - attention_mask.shape[1]
            if n_regions > 0:
                attention_mask = joint_attention_mask(attention_mask, n_regions, vis_attention_mask)
        return super().forward(attention_mask=attention_mask, encoder_outputs=encoder_outputs, **kwargs)


AutoConfig.register(VLT5Config.model_type, VLT5Config, exist_ok=True)
AutoModelForSeq2SeqLM.register(VLT5Config, VLT5ForConditionalGeneration, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# The methods compared in the paper, on one code path


def get_dept_vl_model(
    model: VLT5ForConditionalGeneration, config: DePTConfig, tokenizer=None, train_visual_embedding: bool = True
) -> DePTModelForSeq2SeqLM:
    """Attach DePT to the text of a VL-T5 model; the visual embedding trains with it unless switched off
    (VL-Adapter trains it). Its parameters are counted apart from P, A and B."""
    modules = (VISUAL_MODULE,) if train_visual_embedding else ()
    return get_dept_model(model, config, tokenizer, modules_to_save=modules)


def load_dept_vl_model(
    model: VLT5ForConditionalGeneration, adapter_dir: str | Path, is_trainable: bool = False
) -> DePTModelForSeq2SeqLM:
    """Load a DePT adapter onto a VL-T5 model, with the visual embedding it was saved with, if any (the model's
    load path brings back every module saved with the adapter)."""
    return DePTModelForSeq2SeqLM.from_pretrained(model, adapter_dir, is_trainable=is_trainable)


def prepare_vl_model(
    base_model: VLT5ForConditionalGeneration,
    peft_type: str,
    *,
    dept_config: DePTConfig | None = None,
    tokenizer=None,
    peft_model_id: str | None = None,
    lora_r: int = 8,
    train_visual_embedding: bool = True,
) -> nn.Module:
    """The model to train for `--peft_type`, through the shared `dept.methods.prepare_model`; every method
    takes the same batches (text + visual inputs).

    - PROMPT_TUNING_LORA: DePT as configured by `dept_config` (or loaded from `peft_model_id`).
    - PROMPT_TUNING: vanilla prompt tuning, i.e. DePT with r = 0 (`dept_config.num_virtual_tokens` is l).
    - LORA: PEFT LoRA of rank `lora_r` on the attention q and v projections.
    - FULL: every parameter trains.

    The visual embedding trains in every method unless `train_visual_embedding=False` (FULL trains everything).
    """
    modules = (VISUAL_MODULE,) if train_visual_embedding else ()
    # PEFT has no default LoRA targets for the "vlt5" model type: name T5's q and v.
    lora = LoraSettings(r=lora_r, target_modules=["q", "v"])
    return prepare_model(base_model, peft_type, dept_config=dept_config, tokenizer=tokenizer,
                         peft_model_id=peft_model_id, lora=lora, modules_to_save=modules)
