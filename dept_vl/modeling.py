"""Load the VL-T5 base model and its tokenizer, and make the model ready to train with one method (the one switch
of `dept.methods`). Used by training (`dept_vl.pipeline`), evaluation (`dept_vl.evaluate`) and serving.

VL-T5 (`dept_vl.model`) subclasses transformers' T5, whose import (`transformers.modeling_utils`) costs more than
`import torch`: it is imported when a checkpoint is read, not with this module, so that every command line's
`--help` stays fast. Its import registers the "vlt5" model type, which a saved VL-T5's config names, with
AutoConfig and AutoModelForSeq2SeqLM: each function here that reads a checkpoint calls `vl_t5_classes()` first.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import transformers  # its Auto classes are imported on first use: they load the names of every model

from dept.command_line import MethodArguments
from dept.config import ConfigError
from dept.errors import refusing_remote_code
from dept.extras import LazyModule
from dept.model import DePTModel
from dept_vl.arguments import VLModelArguments
from dept_vl.tasks import TASKS
from dept_vl.vision_backbone import VLT5WithVisionBackbone

if TYPE_CHECKING:
    from dept_vl.model import VLT5Config, VLT5ForConditionalGeneration

vl_t5 = LazyModule("dept_vl.model")  # imported on first use: see the module docstring

REMOTE_CODE_HINT = "VL-T5 bases are T5 checkpoints, and the VL pipeline never runs a model's own code."


def vl_t5_classes() -> tuple[type[VLT5Config], type[VLT5ForConditionalGeneration]]:
    """VL-T5's config and model classes. The first call imports `dept_vl.model`, which registers "vlt5" with
    transformers' Auto classes: call it before reading a checkpoint that may be a saved VL-T5."""
    return vl_t5.VLT5Config, vl_t5.VLT5ForConditionalGeneration


def load_vl_config(model_name_or_path: str, *, trust_remote_code: bool = False):
    """The config of a T5 checkpoint (a `T5Config`) or of a saved VL-T5 (a `VLT5Config`); no weights are read."""
    vl_t5_classes()  # a saved VL-T5's config names the "vlt5" model type, which AutoConfig knows from then on
    with refusing_remote_code(model_name_or_path, REMOTE_CODE_HINT):
        return transformers.AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)


def load_vl_base_model(model_name_or_path: str, feat_dim: int, *,
                       trust_remote_code: bool = False) -> VLT5ForConditionalGeneration:
    """A T5 checkpoint with fresh visual layers for `feat_dim` features, or a saved VL-T5 checked against it."""
    config_class, model_class = vl_t5_classes()
    config = load_vl_config(model_name_or_path, trust_remote_code=trust_remote_code)
    if isinstance(config, config_class) and config.feat_dim != feat_dim:
        raise ConfigError(
            f"{model_name_or_path} is a VL-T5 for {config.feat_dim}-dimensional features, but the features are "
            f"{feat_dim}-dimensional: use features from the backbone it was trained with."
        )
    n_images = max(TASKS[name].n_images for name in TASKS)
    return model_class.from_pretrained(model_name_or_path, feat_dim=feat_dim, n_images=n_images)


def load_tokenizer(model_args: VLModelArguments, *, trust_remote_code: bool = False):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    vl_t5_classes()  # AutoTokenizer reads the model's config too, which for a saved VL-T5 names "vlt5"
    with refusing_remote_code(name, REMOTE_CODE_HINT):
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        raise ConfigError(f"The tokenizer of {model_args.model_name_or_path} has no pad token; T5's tokenizers do.")
    return tokenizer


def build_vl_model(model_args: VLModelArguments, method_args: MethodArguments, tokenizer, feat_dim: int,
                   max_length: int, seed: int):
    """The VL-T5 model ready to train with the chosen method (the one switch of `dept.methods`)."""
    base = load_vl_base_model(model_args.model_name_or_path, feat_dim)
    dept_config = method_args.dept_config(max_length, "seq2seq", model_args.model_name_or_path, seed)
    model = vl_t5.prepare_vl_model(base, method_args.peft_type, dept_config=dept_config, tokenizer=tokenizer,
                                   peft_model_id=method_args.peft_model_id, lora_r=method_args.lora_r,
                                   train_visual_embedding=model_args.train_visual_embedding)
    if model_args.visual_lr is not None and isinstance(model, DePTModel):
        # The trainer asks for the groups with the two DePT rates only; this fixes the modules' own rate.
        model.optimizer_param_groups = functools.partial(model.optimizer_param_groups, modules_lr=model_args.visual_lr)
    elif model_args.visual_lr is not None:
        raise ConfigError(f"--visual_lr applies to DePT and prompt tuning, not to --peft_type {method_args.peft_type}.")
    return model


def model_feat_dim(model) -> int | None:
    """The size of the features the model's VL-T5 reads, or None when it holds none."""
    for module in model.modules():
        if isinstance(module, vl_t5.VLT5ForConditionalGeneration):
            return module.config.feat_dim
    return None


def trainable_parameter_report(model) -> dict[str, int]:
    """Trainable parameters by part: DePT's prompt P and A, B (when present), the visual projection, the ViT's
    P and A, B when it is tuned inside the model (`vision_prompt`, `vision_lora_embedding`), the rest."""
    if isinstance(model, VLT5WithVisionBackbone):
        text = trainable_parameter_report(model.vl_model)
        report = {k: v for k, v in text.items() if k not in ("total", "other")} | model.vision_parameter_report()
        parts = sum(report.values())
        report["total"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        report["other"] = report["total"] - parts
        return report
    if isinstance(model, DePTModel):
        counts = model.num_trainable_parameters()
        report = {"prompt": counts["prompt"], "lora_embedding": counts["lora_embedding"]}
    else:
        report = {}
    trainable = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    visual = vl_t5.VISUAL_MODULE
    report[visual] = sum(n for name, n in trainable if f"{visual}." in name)
    report["total"] = sum(n for _, n in trainable)
    report["other"] = report["total"] - sum(v for k, v in report.items() if k != "total")
    return report
