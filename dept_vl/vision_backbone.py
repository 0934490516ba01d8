"""VL-T5 reading a timm ViT that runs inside the model and is tuned with visual DePT, instead of frozen features.

    pixel_values (batch, images, 3, S, S)
      -> ViT with visual DePT (P after the class token, A @ B on the patch embeddings; `dept_vl.vit`)
      -> final norm, patch tokens only (no class, register or prompt token), on the patch grid
      -> vis_feats (batch, images, H * W, d) and the grid cells' vis_boxes
      -> VL-T5 with text DePT, exactly as for stored features

The patch tokens become regions through `feature_grid` and `grid_boxes`, the code that makes stored grid
features (`GridFeatureExtractor`, `scripts/extract_features.py`), and the images through `grid_transform`, its
preprocessing (timm's data config, resized without a crop so the cells tile the image). So a frozen ViT here
(`vision_peft_type="NONE"`) gives the features that extraction writes to HDF5 for the same images.

The two adapters train together in the one trainer (`optimizer_param_groups` holds both, the vision groups
named `vision_*`) and are saved together: the text adapter where a frozen-feature run puts it (the output
dir's root, `training_task.json` beside it recording the backbone), the vision adapter in `vision_adapter/`.

    >>> import timm
    >>> from transformers import T5Config
    >>> from dept_vl.model import VLT5Config, VLT5ForConditionalGeneration, prepare_vl_model
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
    ...                         embed_dim=32, depth=1, num_heads=2).eval()  # users: create_vision_backbone(name)
    >>> vision = prepare_vit_model(vit, "PROMPT_TUNING_LORA", dept_config=vit_dept_config(vit, 2, 2),
    ...                            train_head=False)
    >>> t5 = T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0)
    >>> text = prepare_vl_model(VLT5ForConditionalGeneration(VLT5Config.from_t5_config(t5, feat_dim=32)),
    ...                         "PROMPT_TUNING_LORA", dept_config=DePTConfig(num_virtual_tokens=3, r=2, max_length=8,
    ...                                                                      prompt_init="random"))
    >>> model = VLT5WithVisionBackbone(vision, text)
    >>> out = model(input_ids=torch.tensor([[5, 6, 1]]), pixel_values=torch.randn(1, 3, 32, 32),
    ...             labels=torch.tensor([[7, 1]]))
    >>> tuple(out.encoder_last_hidden_state.shape)  # text P (3) + 3 tokens + 4 x 4 patches as regions
    (1, 22, 16)
    >>> [group["name"] for group in model.optimizer_param_groups(learning_rate=0.3, lora_embedding_lr=1e-3)]
    ['prompt', 'lora_embedding', 'modules_to_save', 'vision_prompt', 'vision_lora_embedding']

`model.save_pretrained("out")` writes `out/adapter_*` and `out/vision_adapter/adapter_*`;
`VLT5WithVisionBackbone.from_pretrained(vit, vl_t5_base, "out")` loads both back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from dept import DePTConfig
from dept.command_line import config_flag
from dept.config import ConfigError, read_training_task
from dept.errors import FlagError
from dept.extras import LazyModule
from dept_vl.features import create_backbone, feature_grid, grid_boxes, grid_transform, weights_fingerprint
from dept_vl.vit import DePTModelForImageClassification, check_vision_transformer, prepare_vit_model, vit_dept_config

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# VL-T5 subclasses transformers' T5, whose import costs more than `import torch`; it is imported on first use, when
# a pair is loaded onto a VL-T5 already built, so that `--help` (these are `dept-train-vl`'s flags) needs none of it.
vl_t5 = LazyModule("dept_vl.model")

VISION_ADAPTER_DIR = "vision_adapter"  # the vision adapter's place inside the text adapter's directory
VISION_PEFT_TYPES = ("PROMPT_TUNING_LORA", "PROMPT_TUNING", "NONE")
DEFAULT_VISION_PREFIX_LENGTH = 10
DEFAULT_VISION_RANK = 8
VISION_FLAG_SUBJECT = "The ViT tuned inside the model"
TASK_FILE_KEY = "vision_backbone"  # the backbone's record in training_task.json


@dataclass
class VisionBackboneArguments:
    """The ViT tuned inside the model (`--vision_backbone`); images come from `--image_dir`, sized by `--image_size`,
    with pretrained weights unless `--pretrained false`."""

    vision_backbone: str | None = field(
        default=None,
        metadata={"help": "A timm ViT (name, hf-hub:ORG/NAME, or a directory saved by timm) run inside the model on "
                          "--image_dir's images and tuned with --vision_peft_type, instead of frozen features."},
    )
    vision_peft_type: str = field(
        default="PROMPT_TUNING_LORA",
        metadata={"help": "PROMPT_TUNING_LORA (visual DePT), PROMPT_TUNING (VPT-shallow) or NONE (frozen ViT).",
                  "choices": list(VISION_PEFT_TYPES)},
    )
    vision_prefix_length: int | None = config_flag(
        "vision_prefix_length", None, f"{DEFAULT_VISION_PREFIX_LENGTH}, or the --peft_model_id pair's",
        field_name="num_virtual_tokens", subject=VISION_FLAG_SUBJECT)
    vision_r: int | None = config_flag(
        "vision_r", None, f"{DEFAULT_VISION_RANK}, or the --peft_model_id pair's (A has one row per patch)",
        field_name="r", subject=VISION_FLAG_SUBJECT)
    vision_lora_alpha: float = config_flag("vision_lora_alpha", field_name="lora_alpha", subject=VISION_FLAG_SUBJECT)
    vision_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the ViT's prompt (default --learning_rate)."})
    vision_lora_embedding_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the ViT's A and B (default --lora_embedding_lr)."})

    def __post_init__(self):
        if self.vision_peft_type not in VISION_PEFT_TYPES:
            raise FlagError(f"--vision_peft_type {self.vision_peft_type!r}: choose one of {VISION_PEFT_TYPES}.")
        if not self.vision_backbone:
            given = [f"--{name}" for name in ("vision_prefix_length", "vision_r", "vision_learning_rate",
                                              "vision_lora_embedding_lr") if getattr(self, name) is not None]
            if given:
                raise FlagError(f"{', '.join(given)} set the ViT tuned inside the model: pass --vision_backbone too, "
                                "or drop them.")

    @property
    def tunes_backbone(self) -> bool:
        return self.vision_peft_type != "NONE"


def check_vision_flags(vision_args: VisionBackboneArguments, data_args) -> None:
    """Refuse, before anything loads, data flags that contradict a backbone inside the model."""
    if data_args.feature_file:
        raise FlagError(
            f"--vision_backbone computes the image features inside the model, from --image_dir's images, so "
            f"--feature_file {data_args.feature_file} would be ignored: drop one of the two."
        )
    if not data_args.image_dir:
        raise FlagError("--vision_backbone reads raw images: pass --image_dir (one directory, or task=dir,...).")
    if data_args.backbone != "resnet50":  # the field's default: --backbone was given
        raise FlagError(
            f"--backbone {data_args.backbone} names a frozen feature backbone; with --vision_backbone "
            f"{vision_args.vision_backbone} that ViT makes the features. Drop --backbone."
        )


def create_vision_backbone(name: str, pretrained: bool = True, image_size: int | None = None,
                           seed: int | None = None) -> VisionTransformer:
    """The frozen timm ViT: `timm.create_model(name, pretrained, num_classes=0)` (see `create_backbone`)."""
    vit = check_vision_transformer(create_backbone(name, pretrained=pretrained, image_size=image_size, seed=seed))
    return vit.requires_grad_(False).eval()


def vit_transform(vit: VisionTransformer):
    """The images' preprocessing for `vit`: that of grid features (`grid_transform`), at the size it was built for
    (its pretrained config may name another)."""
    return grid_transform(vit, tuple(vit.patch_embed.img_size))[1]


class VLT5WithVisionBackbone(nn.Module):
    """A ViT (visually DePT-tuned, or frozen) whose patch tokens are the regions of a VL model (see the module
    docstring).

    `forward` and `generate` take the VL model's inputs with `pixel_values` (batch, images, 3, S, S) (or
    (batch, 3, S, S)) in place of `vis_feats` / `vis_boxes`; `vis_attention_mask` (batch, images, regions) marks
    the images present (a missing second image of a one-image row is not run through the ViT).

    Args:
        vision: a `DePTModelForImageClassification` (trained with the text adapter), or a frozen timm
            `VisionTransformer` (its features equal the stored ones).
        vl_model: the VL-T5 model ready to train (text DePT, a baseline, or a loaded adapter).
        vision_learning_rate, vision_lora_embedding_lr: the ViT's P and A, B rates (default: the text ones).
    """

    supports_gradient_checkpointing = True

    def __init__(self, vision: nn.Module, vl_model: nn.Module, vision_learning_rate: float | None = None,
                 vision_lora_embedding_lr: float | None = None):
        super().__init__()
        if not isinstance(vision, DePTModelForImageClassification):
            check_vision_transformer(vision).requires_grad_(False)
        self.vision = vision
        self.vl_model = vl_model
        self.vision_learning_rate = vision_learning_rate
        self.vision_lora_embedding_lr = vision_lora_embedding_lr
        self.register_buffer("grid_boxes", torch.from_numpy(grid_boxes(*self.vit.patch_embed.grid_size)),
                             persistent=False)

    @property
    def tunes_vision(self) -> bool:
        return isinstance(self.vision, DePTModelForImageClassification)

    @property
    def vit(self) -> VisionTransformer:
        return self.vision.base_model if self.tunes_vision else self.vision

    @property
    def n_regions(self) -> int:
        return self.grid_boxes.shape[0]

    # ----------------------------------------------------------------------------------------------- the forward
    def visual_inputs(self, pixel_values: torch.Tensor, vis_attention_mask: torch.Tensor | None = None) -> dict:
        """`vis_feats` (batch, images, regions, d), `vis_boxes` (batch, images, regions, 4) and the mask."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values.unsqueeze(1)
        size, own_size = tuple(pixel_values.shape[-2:]), tuple(self.vit.patch_embed.img_size)
        if pixel_values.ndim != 5 or size != own_size:
            raise ValueError(
                f"pixel_values must be (batch, images, 3, {own_size[0]}, {own_size[1]}) for this ViT, got "
                f"{tuple(pixel_values.shape)}: preprocess the images with vit_transform(model.vit), as the pipeline "
                "does."
            )
        batch, images = pixel_values.shape[:2]
        if vis_attention_mask is None:
            vis_attention_mask = torch.ones(batch, images, self.n_regions, dtype=torch.long, device=pixel_values.device)
        present = vis_attention_mask[:, :, 0].bool()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tunes_vision):
            grid = feature_grid(self.vit, self.vision.forward_features(pixel_values[present]))
        regions = grid.flatten(1, 2)  # (present images, H * W, d), row-major as the boxes
        if bool(present.all()):
            vis_feats = regions.reshape(batch, images, *regions.shape[1:])
        else:
            vis_feats = regions.new_zeros(batch, images, *regions.shape[1:])
            vis_feats[present] = regions
        vis_boxes = self.grid_boxes.to(vis_feats.dtype).expand(batch, images, -1, -1)
        return {"vis_feats": vis_feats, "vis_boxes": vis_boxes, "vis_attention_mask": vis_attention_mask}

    def forward(self, pixel_values: torch.Tensor, vis_attention_mask: torch.Tensor | None = None, **inputs):
        return self.vl_model(**inputs, **self.visual_inputs(pixel_values, vis_attention_mask))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, vis_attention_mask: torch.Tensor | None = None, **inputs):
        return self.vl_model.generate(**inputs, **self.visual_inputs(pixel_values, vis_attention_mask))

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.tunes_vision:  # a frozen ViT makes the features extraction makes: no dropout, no drop-path
            self.vision.eval()
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute the blocks of both models in the backward pass (the trainer's --gradient_checkpointing)."""
        if self.tunes_vision:
            self.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs)
        for module in self.vl_model.modules():
            if hasattr(module, "gradient_checkpointing_enable") and getattr(module, "supports_gradient_checkpointing",
                                                                            False):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
                return

    # ----------------------------------------------------------------------------------------------- training
    def optimizer_param_groups(self, learning_rate: float, lora_embedding_lr: float, weight_decay: float = 0.0
                               ) -> list[dict]:
        """The VL model's groups (or one group of its trainable weights at `learning_rate` for LoRA and full
        fine-tuning), then the ViT's P and A, B as `vision_prompt` and `vision_lora_embedding`."""
        if hasattr(self.vl_model, "optimizer_param_groups"):
            groups = self.vl_model.optimizer_param_groups(learning_rate, lora_embedding_lr, weight_decay)
        else:
            groups = [{"name": "model", "params": [p for p in self.vl_model.parameters() if p.requires_grad],
                       "lr": learning_rate, "weight_decay": weight_decay}]
        if self.tunes_vision:
            prompt_lr = learning_rate if self.vision_learning_rate is None else self.vision_learning_rate
            lora_lr = lora_embedding_lr if self.vision_lora_embedding_lr is None else self.vision_lora_embedding_lr
            groups += [dict(group, name=f"vision_{group['name']}")
                       for group in self.vision.optimizer_param_groups(prompt_lr, lora_lr, weight_decay)]
        return groups

    def vision_parameter_report(self) -> dict[str, int]:
        """Trainable parameters of the ViT's adapter: `vision_prompt` (P) and `vision_lora_embedding` (A, B)."""
        if not self.tunes_vision:
            return {"vision_prompt": 0, "vision_lora_embedding": 0}
        counts = self.vision.num_trainable_parameters()
        return {"vision_prompt": counts["prompt"], "vision_lora_embedding": counts["lora_embedding"]}

    # ----------------------------------------------------------------------------------------------- save, load
    def save_pretrained(self, save_directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """The VL model's adapter in `save_directory` (as without a backbone), the ViT's in `vision_adapter/`.

        `state_dict`: whole tensors by parameter name (the trainer's, under DeepSpeed and FSDP), split by part.
        """
        directory = Path(save_directory)

        def part(prefix: str) -> dict:
            return {} if state_dict is None else {
                "state_dict": {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}}

        self.vl_model.save_pretrained(str(directory), **part("vl_model."))
        if self.tunes_vision:
            self.vision.save_pretrained(directory / VISION_ADAPTER_DIR, **part("vision."))
        return directory

    @classmethod
    def from_pretrained(cls, vit: VisionTransformer, vl_base: nn.Module, adapter_dir: str | Path,
                        is_trainable: bool = False, **kwargs) -> VLT5WithVisionBackbone:
        """The pair saved by `save_pretrained` on its two bases: the text adapter (and visual projection) onto
        the VL-T5 `vl_base`, the vision adapter, if any, onto the frozen `vit`."""
        vl_model = vl_t5.load_dept_vl_model(vl_base, adapter_dir, is_trainable=is_trainable)
        vision = load_vision_adapter(vit, adapter_dir, is_trainable) or vit
        model = cls(vision, vl_model, **kwargs)
        return model if is_trainable else model.eval()


def vision_adapter_dir(adapter_dir: str | Path | None) -> Path | None:
    """`adapter_dir/vision_adapter` when the directory holds a pair, else None."""
    if not adapter_dir:
        return None
    path = Path(adapter_dir) / VISION_ADAPTER_DIR
    return path if path.is_dir() else None


def load_vision_adapter(vit: VisionTransformer, adapter_dir: str | Path, is_trainable: bool = False):
    """The pair's vision adapter on `vit` (no head: the regions are the patch tokens), or None if it has none."""
    path = vision_adapter_dir(adapter_dir)
    if path is None:
        return None
    return DePTModelForImageClassification.from_pretrained(vit, path, is_trainable=is_trainable, modules_to_save=())


def attach_vision_backbone(vl_model: nn.Module, vit: VisionTransformer, vision_args: VisionBackboneArguments,
                           peft_model_id: str | None = None, seed: int = 0) -> VLT5WithVisionBackbone:
    """The ViT with a fresh visual DePT adapter (or the `peft_model_id` pair's, or none for NONE) next to `vl_model`."""
    saved = vision_adapter_dir(peft_model_id)
    if not vision_args.tunes_backbone:
        vision = vit
    elif saved is not None:
        vision = prepare_vit_model(vit, vision_args.vision_peft_type, peft_model_id=str(saved), train_head=False)
    else:
        m, r = vision_args.vision_prefix_length, vision_args.vision_r
        m = DEFAULT_VISION_PREFIX_LENGTH if m is None else m
        r = DEFAULT_VISION_RANK if r is None else r
        config = vit_dept_config(vit, m, r, lora_alpha=vision_args.vision_lora_alpha, init_seed=seed,
                                 base_model_name_or_path=vision_args.vision_backbone)
        vision = prepare_vit_model(vit, vision_args.vision_peft_type, dept_config=config, train_head=False)
    return VLT5WithVisionBackbone(vision, vl_model, vision_args.vision_learning_rate,
                                  vision_args.vision_lora_embedding_lr)


# ----------------------------------------------------------------------------------------------- the record


def backbone_record(model: VLT5WithVisionBackbone, vision_args: VisionBackboneArguments, pretrained: bool) -> dict:
    """What `training_task.json` records about the backbone, so the pair is only ever reloaded onto it."""
    height, width = model.vit.patch_embed.img_size
    return {"backbone": vision_args.vision_backbone, "pretrained": bool(pretrained), "image_size": [height, width],
            "peft_type": vision_args.vision_peft_type,
            "adapter": VISION_ADAPTER_DIR if model.tunes_vision else None,
            "weights_sha256": weights_fingerprint(model.vit)}


def read_backbone_record(adapter_dir: str | Path | None) -> dict | None:
    """The backbone record of a pair saved by `dept-train-vl --vision_backbone`, or None for any other adapter."""
    record = read_training_task(adapter_dir) if adapter_dir and Path(adapter_dir).is_dir() else None
    return (record or {}).get(TASK_FILE_KEY)


def pair_refusal(source: str, training_task: dict | None, tool: str) -> str | None:
    """Why `tool` (which computes or reads frozen features) must not run the adapter at `source`, if it is a pair
    whose text adapter reads a ViT tuned with it; None for any other adapter."""
    record = (training_task or {}).get(TASK_FILE_KEY)
    if not record:
        return None
    return (f"{source} is a pair: its text adapter reads features from a ViT it tuned itself "
            f"({record.get('backbone')}, in {VISION_ADAPTER_DIR}/, --vision_backbone), which {tool} does not load: "
            "evaluate the pair with dept-train-vl --peft_model_id DIR --vision_backbone ... --image_dir ... --do_eval.")


def check_pair_flags(peft_model_id: str | None, vision_args: VisionBackboneArguments | None) -> None:
    """Refuse, before anything loads, to continue a pair without its backbone or with another one, and a frozen-
    feature adapter that is asked to bring a vision adapter."""
    record = read_backbone_record(peft_model_id)
    if record is None:
        return
    given = vision_args.vision_backbone if vision_args is not None else None
    if not given:
        raise FlagError(
            f"{peft_model_id} was trained with the image features of {record['backbone']} computed inside the model "
            f"(--vision_peft_type {record['peft_type']}): pass --vision_backbone {record['backbone']} "
            f"--vision_peft_type {record['peft_type']} and --image_dir, so that it reads the features it was trained "
            "on."
        )
    if given != record["backbone"] or vision_args.vision_peft_type != record["peft_type"]:
        raise FlagError(
            f"{peft_model_id} was trained with --vision_backbone {record['backbone']} --vision_peft_type "
            f"{record['peft_type']}, not {given} {vision_args.vision_peft_type}: pass those."
        )
    saved = vision_adapter_dir(peft_model_id)
    if saved is not None:  # the saved sizes fix the adapter: flags that differ would be silently ignored
        config = DePTConfig.from_pretrained(saved)
        conflicts = [f"--{flag} {value} (the pair has {own})" for flag, value, own in (
            ("vision_prefix_length", vision_args.vision_prefix_length, config.num_virtual_tokens),
            ("vision_r", vision_args.vision_r, config.r)) if value is not None and value != own]
        if conflicts:
            raise FlagError(f"--peft_model_id {peft_model_id} fixes the vision adapter's sizes, but "
                            f"{', '.join(conflicts)}: drop these flags.")


def check_backbone_weights(vit: VisionTransformer, peft_model_id: str | None) -> None:
    """Refuse a ViT whose frozen weights differ from those the pair was trained on (another checkpoint, or other
    random weights): its adapter and its text adapter would read other features."""
    record = read_backbone_record(peft_model_id)
    if record is not None and record.get("weights_sha256") not in (None, weights_fingerprint(vit)):
        raise ConfigError(
            f"The weights of {record['backbone']} differ from those {peft_model_id} was trained with (SHA-256 "
            f"{record['weights_sha256'][:12]}...): load the same checkpoint (--pretrained {record['pretrained']})."
        )
