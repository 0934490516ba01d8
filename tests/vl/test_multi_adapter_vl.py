"""Several DePT adapters (each with its own visual projection) served by one frozen VL-T5 in one batch."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dept import DePTModel, MultiAdapterModel
from tests.vl.conftest import make_regions, save_trained_vl_adapter

TEXTS = ["vqa: what color is the circle?", "gqa: what shape is on the left?", "caption:"]


def _trained_adapter(vl_model, tokenizer, directory, seed, **sizes):
    save_trained_vl_adapter(vl_model, tokenizer, directory, seed, **sizes)
    assert any(key.startswith("modules.visual_embedding.") for key in load_file(directory / "adapter_model.safetensors"))


def test_each_row_of_a_mixed_vl_batch_matches_its_adapter_alone(vl_model, tokenizer, tmp_path):
    pristine = {name: p.detach().clone() for name, p in vl_model.visual_embedding.state_dict().items()}
    _trained_adapter(vl_model, tokenizer, tmp_path / "a", seed=1, num_virtual_tokens=4, r=2, max_length=24)
    vl_model.visual_embedding.load_state_dict(pristine)
    _trained_adapter(vl_model, tokenizer, tmp_path / "b", seed=2, num_virtual_tokens=2, r=3, max_length=24)
    vl_model.visual_embedding.load_state_dict(pristine)

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    regions = make_regions(len(TEXTS))
    decoder_input_ids = torch.zeros(len(TEXTS), 2, dtype=torch.long)
    names = ["a", "b", "a"]
    multi = MultiAdapterModel(vl_model, {"a": tmp_path / "a", "b": tmp_path / "b"})
    with torch.no_grad():
        mixed = multi(**batch, **regions, decoder_input_ids=decoder_input_ids, adapter_names=names).logits
        mixed_tokens = multi.generate(**batch, **regions, adapter_names=names, max_new_tokens=4, min_new_tokens=4)
    for row, name in enumerate(names):
        vl_model.visual_embedding.load_state_dict(pristine)
        alone = DePTModel.from_pretrained(vl_model, tmp_path / name)
        one = {key: value[row:row + 1] for key, value in {**batch, **regions}.items()}
        one["input_ids"] = one["input_ids"][:, : int(one["attention_mask"].sum())]
        one["attention_mask"] = one["attention_mask"][:, : one["input_ids"].shape[1]]
        with torch.no_grad():
            logits = alone(**one, decoder_input_ids=decoder_input_ids[row:row + 1]).logits
            tokens = alone.generate(**one, max_new_tokens=4, min_new_tokens=4)
        torch.testing.assert_close(mixed[row], logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(mixed_tokens[row], tokens[0])
