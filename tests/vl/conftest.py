"""Tiny VL-T5 fixtures (d_model 32, 16-dimensional region features, 4 regions per image), a tiny timm ViT, and
readers of a run's result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from dept import DePTConfig
from dept_vl.model import VLT5Config, VLT5ForConditionalGeneration, get_dept_vl_model
from tests.conftest import tiny_t5_config

FEAT_DIM = 16
N_REGIONS = 4
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def make_regions(batch: int, n_regions: int = N_REGIONS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random region features and valid boxes (x1 < x2, y1 < y2, inside [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch, n_regions, 2, 2, generator=generator).sort(dim=2).values  # (.., x|y, low|high)
    boxes = torch.stack([corners[..., 0, 0], corners[..., 1, 0], corners[..., 0, 1], corners[..., 1, 1]], dim=-1)
    return {"vis_feats": torch.randn(batch, n_regions, FEAT_DIM, generator=generator), "vis_boxes": boxes}


def save_trained_vl_adapter(vl_model, tokenizer, directory, seed: int, visual_scale: float = 0.1, **sizes):
    """A stand-in for a trained VL adapter, saved the real way: DePT on `vl_model` (`sizes` are DePTConfig fields)
    with a non-zero B and its own visual projection; `vl_model`'s visual embedding is moved in place."""
    model = get_dept_vl_model(vl_model, DePTConfig(prompt_init="vocab", init_seed=seed, **sizes), tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.prompt_encoder.lora_embedding_B.normal_(0, 0.5, generator=generator)
        for param in vl_model.visual_embedding.parameters():
            param.add_(visual_scale * torch.randn(param.shape, generator=generator))
    return model.save_pretrained(directory)


@pytest.fixture(scope="session")
def vl_config(tokenizer):
    return VLT5Config.from_t5_config(tiny_t5_config(len(tokenizer)), feat_dim=FEAT_DIM, n_images=2)


@pytest.fixture
def vl_model(vl_config):
    torch.manual_seed(0)
    return VLT5ForConditionalGeneration(vl_config).eval()


def tiny_vit(seed: int = 0, **overrides):
    """timm's ViT at TINY_VIT's sizes (random weights), in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, **overrides})
    return model.eval()


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def predictions(output_dir: Path, split: str = "test") -> list[str]:
    lines = (output_dir / f"predictions_{split}.jsonl").read_text().splitlines()
    return [json.loads(line)["prediction"] for line in lines]
