"""Tiny VL-T5 fixtures: d_model 32, 16-dimensional region features, 4 regions per image."""

from __future__ import annotations

import pytest
import torch

from dept import DePTConfig
from dept_vl.model import VLT5Config, VLT5ForConditionalGeneration, get_dept_vl_model
from tests.conftest import tiny_t5_config

FEAT_DIM = 16
N_REGIONS = 4


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
