"""Visual DePT: the DePT decomposition on a timm `VisionTransformer`'s patch embeddings.

A ViT's input is a sequence of patch embeddings with learned positions, so DePT applies as it does to text:
VPT-shallow (Jia et al., 2022) puts l prompt tokens in front of the patches; visual DePT spends the same budget
on a shorter prompt P (m x d) plus a position-wise low-rank update A @ B with one row of A per patch position
(s = number of patches):

    E  = patch_embed(image)                          # (batch, s, d), frozen; patch i in row-major grid order
    E' = E + lora_alpha / sqrt(r) * (A @ B)          # before the position embedding is added
    X  = [prefix(E' + pos) ; P ; patches(E' + pos)]  # P right after the class (and register) tokens, as VPT

then timm's blocks, final norm and head, with the m prompt outputs dropped before pooling, so the head pools
exactly what it pooled before (the class token, or the mean of the patches for `global_pool="avg"`).
r = 0 is VPT-shallow; P starts as VPT's prompts do (uniform, Xavier's bound for a patch projection).

Where A @ B goes: after `patch_embed`, before timm's `_pos_embed` adds the position embedding. This is where
text DePT adds it: to the word embeddings, before an absolute-position model (BERT, GPT-2) adds its positions.
Since addition commutes, the output equals adding A @ B after the position embedding for a plain ViT, but the
earlier place is the one that stays right for every timm variant: the update then passes through everything
timm does to the patch embeddings (position dropout, `norm_pre` of CLIP-style ViTs), row i is always patch i
(`patch_drop` would drop and shuffle patches after `_pos_embed`), and under `dynamic_img_size` the update is
resampled to the new patch grid exactly as timm resamples the position embedding (bicubic, antialiased), so a
row of A keeps meaning the same place in the image at any input size.

Where P goes: after `_pos_embed`, `patch_drop` and `norm_pre`, i.e. the input of the first block, as VPT's
`incorporate_prompt` (it prepends after the embeddings, position embedding and dropout included). P therefore
has no position embedding, and PatchDropout never drops it.

The frozen backbone stays in eval mode while training (VPT's `PromptedTransformer.train` does the same), so
its dropout and drop-path are off; the head and the prompt train.

    >>> import timm
    >>> from dept import DePTConfig
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
    ...                         embed_dim=32, depth=1, num_heads=2, num_classes=3)
    >>> model = DePTModelForImageClassification(vit, DePTConfig(num_virtual_tokens=2, r=2, max_length=16,
    ...                                                        prompt_init="random", task_type="cls"))
    >>> model.num_trainable_parameters()  # P 2x32, A 16x2 + B 2x32, the head 32x3 + 3
    {'prompt': 64, 'lora_embedding': 96, 'dept': 160, 'head': 99, 'total': 259}
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from dept import DePTConfig, DePTModel
from dept.config import ConfigError
from dept.extras import LazyModule
from dept.methods import LoraSettings, prepare_model

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

timm = LazyModule("timm")  # imported on first use: it costs more than `import torch` at start-up

VIT_MODEL_TYPE = "timm_vision_transformer"  # recorded as base_model_type, checked at load
HEAD_MODULE = "head"
LORA_TARGET_MODULES = ["qkv"]  # timm's fused attention input projection


def check_vision_transformer(model: nn.Module) -> VisionTransformer:
    if not isinstance(model, timm.models.VisionTransformer):
        raise ConfigError(
            f"Visual DePT needs a timm VisionTransformer (patch_embed, class token, position embedding); got "
            f"{type(model).__name__}. Use a ViT such as timm.create_model('vit_base_patch16_224')."
        )
    return model


def num_patches(model: VisionTransformer) -> int:
    """s: patch positions of the model's own grid (196 for ViT-B/16 at 224 px), one row of A each."""
    height, width = model.patch_embed.grid_size
    return height * width


def classification_output(logits: torch.Tensor, labels: torch.Tensor | None) -> ImageClassifierOutput:
    loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
    return ImageClassifierOutput(loss=loss, logits=logits)


class DePTModelForImageClassification(DePTModel):
    """DePT on a timm `VisionTransformer` (see the module docstring), with its `head` trained and reported apart.

    `forward(pixel_values, labels=None)` returns `ImageClassifierOutput(loss, logits)`.
    """

    task_type = "cls"
    supports_gradient_checkpointing = True  # the trainer's --gradient_checkpointing

    def __init__(self, base_model: nn.Module, config: DePTConfig, tokenizer=None,
                 modules_to_save: tuple[str, ...] = (HEAD_MODULE,), initialize: bool = True):
        vit = check_vision_transformer(base_model)
        if config.max_length != num_patches(vit):
            height, width = vit.patch_embed.grid_size
            raise ConfigError(
                f"A has one row per patch position: max_length must be the model's {num_patches(vit)} patches "
                f"({height} x {width} grid), got {config.max_length}. Set max_length={num_patches(vit)}."
            )
        super().__init__(vit, config, tokenizer, modules_to_save, initialize)
        self.gradient_checkpointing = False

    # --------------------------------------------------------------------------------------------- the base
    @classmethod
    def describe_base(cls, base_model: nn.Module) -> dict:
        vit = check_vision_transformer(base_model)
        pretrained_cfg = getattr(vit, "pretrained_cfg", None) or {}
        name = pretrained_cfg.get("architecture")
        if name and pretrained_cfg.get("tag"):
            name = f"{name}.{pretrained_cfg['tag']}"
        return {"token_dim": vit.embed_dim, "vocab_size": None, "base_model_type": VIT_MODEL_TYPE,
                "base_model_name_or_path": name}

    def input_device(self) -> torch.device:
        return self.base_model.patch_embed.proj.weight.device

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.base_model.patch_embed.grid_size)

    def _initialize_prompt(self, tokenizer) -> None:
        """A, B as in text DePT; P ~ U(-v, v) with v = sqrt(6 / (channels * patch_h * patch_w + d)), VPT's init."""
        if self.config.num_virtual_tokens and self.config.prompt_init != "random":
            raise ConfigError(
                f"prompt_init={self.config.prompt_init!r} needs a vocabulary; images have none. Use "
                "prompt_init='random' (VPT's initialisation)."
            )
        proj = self.base_model.patch_embed.proj
        fan_in = proj.in_channels * math.prod(proj.kernel_size)
        self.prompt_encoder.initialize(prompt_bound=math.sqrt(6.0 / (fan_in + self.prompt_encoder.token_dim)))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # the frozen backbone keeps eval behaviour (no dropout or drop-path), as in VPT
            self.base_model.eval()
            for name in self.modules_to_save:
                getattr(self.base_model, name).train(True)
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block in the backward pass (non-reentrant), through timm's `checkpoint_seq`."""
        self.gradient_checkpointing = True

    # --------------------------------------------------------------------------------------------- the forward
    def patch_embedding_update(self, grid: tuple[int, int]) -> torch.Tensor:
        """scaling * (A @ B) laid out on a patch grid: (height, width, d); resampled as timm resamples
        `pos_embed` when the grid is not the model's own (dynamic image size)."""
        update = self.prompt_encoder.embedding_update()  # (s, d); cached in eval mode
        if tuple(grid) != self.grid_size:
            update = timm.layers.resample_abs_pos_embed(update.unsqueeze(0), new_size=list(grid), old_size=list(self.grid_size),
                                            num_prefix_tokens=0).squeeze(0)
        return update.view(*grid, -1)

    def embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The first block's input: `[prefix tokens ; P ; patches + A @ B + pos]`, (batch, prefix + m + patches, d)."""
        vit = self.base_model
        size, own_size = tuple(pixel_values.shape[-2:]), tuple(vit.patch_embed.img_size)
        if not vit.dynamic_img_size and getattr(vit.patch_embed, "strict_img_size", True) and size != own_size:
            raise ValueError(
                f"The images are {size[0]} x {size[1]} but this ViT takes {own_size[0]} x {own_size[1]} (its position "
                "embedding and A have one row per patch of that grid). Resize the images (the pipeline's timm "
                "transforms do), or build the ViT with dynamic_img_size=True so both follow the patch grid."
            )
        x = vit.patch_embed(pixel_values)  # (batch, s, d), or (batch, H, W, d) under dynamic_img_size
        if x.ndim == 4:
            grid = tuple(x.shape[1:3])
        elif x.shape[1] == num_patches(vit):
            grid = self.grid_size
        else:
            raise ValueError(
                f"The image gives {x.shape[1]} patches but A has rows for the model's {num_patches(vit)} "
                f"({self.grid_size[0]} x {self.grid_size[1]}). Resize images to the model's input size, or build "
                "the ViT with dynamic_img_size=True so position embedding and A @ B follow the patch grid."
            )
        if self.config.r > 0:
            update = self.patch_embedding_update(grid).to(x.dtype)
            x = x + (update if x.ndim == 4 else update.flatten(0, 1))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        prefix = vit.num_prefix_tokens
        prompt = self.prompt_encoder.prompt_embeddings.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :prefix], prompt, x[:, prefix:]], dim=1)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """timm's `forward_features` with the prompt: (batch, prefix + patches, d), the prompt outputs dropped."""
        vit = self.base_model
        x = self.embed_patches(pixel_values)
        if self.gradient_checkpointing and self.training:
            x = timm.models.checkpoint_seq(vit.blocks, x, use_reentrant=False)
        else:
            x = vit.blocks(x)
        x = vit.norm(x)
        prefix, m = vit.num_prefix_tokens, self.config.num_virtual_tokens
        return torch.cat([x[:, :prefix], x[:, prefix + m:]], dim=1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.base_model.forward_head(self.forward_features(pixel_values))
        return classification_output(logits, labels)


class TimmImageClassifier(nn.Module):
    """A timm model with the trainer's interface, for the LoRA and full fine-tuning baselines:
    `forward(pixel_values, labels=None)` -> `ImageClassifierOutput(loss, logits)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        return classification_output(self.model(pixel_values), labels)


def vit_dept_config(vit: VisionTransformer, num_virtual_tokens: int, r: int, **kwargs) -> DePTConfig:
    """A DePT config for `vit`: max_length = its number of patches, task_type "cls", VPT's prompt init."""
    kwargs.setdefault("prompt_init", "random")
    return DePTConfig(num_virtual_tokens=num_virtual_tokens, r=r, max_length=num_patches(vit), task_type="cls",
                      **kwargs)


def prepare_vit_model(
    vit: nn.Module,
    peft_type: str,
    *,
    dept_config: DePTConfig | None = None,
    peft_model_id: str | None = None,
    lora_r: int = 8,
    train_head: bool = True,
) -> nn.Module:
    """The ViT classifier to train for `--peft_type`, through the shared `dept.methods.prepare_model`.

    - PROMPT_TUNING_LORA: visual DePT; PROMPT_TUNING: VPT-shallow (r = 0, `num_virtual_tokens` is l);
    - LORA: PEFT LoRA of rank `lora_r` on every block's `qkv`; FULL: every weight trains.

    The head trains in every method unless `train_head=False` (FULL trains everything).
    """
    check_vision_transformer(vit)
    modules = (HEAD_MODULE,) if train_head else ()
    if peft_type in ("PROMPT_TUNING_LORA", "PROMPT_TUNING"):
        return prepare_model(vit, peft_type, dept_config=dept_config, peft_model_id=peft_model_id,
                             modules_to_save=modules, model_class=DePTModelForImageClassification)
    lora = LoraSettings(r=lora_r, target_modules=LORA_TARGET_MODULES, custom_model=True)
    return prepare_model(TimmImageClassifier(vit), peft_type, peft_model_id=peft_model_id, lora=lora,
                         modules_to_save=modules)


def trainable_parameter_report(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by part: P and A, B (DePT and VPT), the head, the rest (LoRA or every weight)."""
    report = {}
    if isinstance(model, DePTModel):
        counts = model.num_trainable_parameters()
        report = {"prompt": counts["prompt"], "lora_embedding": counts["lora_embedding"]}
    trainable = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    report[HEAD_MODULE] = sum(n for name, n in trainable if f".{HEAD_MODULE}." in f".{name}")
    report["total"] = sum(n for _, n in trainable)
    report["other"] = report["total"] - sum(v for k, v in report.items() if k != "total")
    return report
