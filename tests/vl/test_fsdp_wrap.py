"""VL-T5 under FSDP: configs/accelerate/fsdp.yaml and fsdp2.yaml wrap T5Blocks, which is what VL-T5's blocks are."""

from __future__ import annotations

from accelerate.utils.dataclasses import get_module_class_from_name

from dept_vl.model import VLT5Config, VLT5ForConditionalGeneration
from tests.conftest import tiny_t5_config


def test_vl_t5_blocks_are_t5_blocks_so_the_t5_fsdp_config_wraps_them():
    base = tiny_t5_config(vocab_size=50)
    model = VLT5ForConditionalGeneration(VLT5Config(**base.to_dict(), feat_dim=8))
    layer_class = get_module_class_from_name(model, "T5Block")
    assert layer_class is not None and sum(isinstance(m, layer_class) for m in model.modules()) == 4
