"""Many adapters over one frozen model: each row of a mixed batch behaves exactly as its adapter run alone."""

import copy
import warnings

import pytest
import torch

from dept import AdapterMismatchError, ConfigError, DePTModel, InputTooLongError, MultiAdapterModel
from dept.model import DePTModelForCausalLM, DePTModelForSeq2SeqLM
from tests.conftest import ADAPTER_SIZES, OFFICIAL_CHECKPOINTS, attach, float32_paths
from tests.dept.conftest import ROW_ADAPTERS, save_adapters, tokenize

TEXTS = [
    "the movie was great",
    "a dull and boring film with terrible acting and actors",
    "red circle",
    "question: what color is the sky?",
    "sentence1: a man is playing a guitar .",
]


def logits(kind, model, batch, **kwargs):
    if kind == "t5":
        kwargs["decoder_input_ids"] = torch.zeros(batch["input_ids"].shape[0], 3, dtype=torch.long)
    return model(**batch, **kwargs).logits


def alone(kind, model, adapter_dir):
    """The adapter loaded the single-adapter way, on its own copy of the base model."""
    return DePTModel.from_pretrained(copy.deepcopy(model), adapter_dir)


@pytest.mark.parametrize("side", ["right", "left"])
def test_each_row_of_a_mixed_batch_gives_its_adapters_logits(any_model, tokenizer, tmp_path, side):
    kind, model = any_model
    paths = save_adapters(kind, model, tokenizer, tmp_path)
    multi = MultiAdapterModel(model, paths)
    batch = tokenize(tokenizer, TEXTS, side)
    mixed = logits(kind, multi, batch, adapter_names=ROW_ADAPTERS)
    if kind == "llama":  # logits of the real tokens only (the prompt slots differ in number per row)
        _, mask, _ = multi.embed(ROW_ADAPTERS, batch["input_ids"], batch["attention_mask"])
        mixed = [row[keep.bool()] for row, keep in zip(mixed, mask)]
    for row, (text, name) in enumerate(zip(TEXTS, ROW_ADAPTERS)):
        with torch.no_grad():
            expected = logits(kind, alone(kind, model, paths[name]), tokenizer([text], return_tensors="pt"))[0]
        torch.testing.assert_close(mixed[row], expected, **float32_paths(expected), msg=f"row {row} ({name})")


def test_classifier_rows_use_their_own_heads(bert_model, tokenizer, tmp_path):
    paths = save_adapters("bert", bert_model, tokenizer, tmp_path)
    other_head = alone("bert", bert_model, paths["long_prompt"])  # the same P, A and B ...
    with torch.no_grad():
        other_head.base_model.classifier.weight.mul_(-1.0)  # ... and another head
    paths["other_head"] = other_head.save_pretrained(tmp_path / "other_head")
    multi = MultiAdapterModel(bert_model, paths)
    batch = tokenizer(TEXTS[:1] * 2, return_tensors="pt")
    mixed = logits("bert", multi, batch, adapter_names=["long_prompt", "other_head"])
    with torch.no_grad():
        expected = [logits("bert", alone("bert", bert_model, paths[name]), batch)[0]
                    for name in ("long_prompt", "other_head")]
    torch.testing.assert_close(mixed[0], expected[0], **float32_paths(expected[0]))
    torch.testing.assert_close(mixed[1], expected[1], **float32_paths(expected[1]))
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_each_row_of_a_mixed_batch_generates_its_adapters_tokens(kind, request, tokenizer, tmp_path):
    model = request.getfixturevalue(f"{kind}_model")
    paths = save_adapters(kind, model, tokenizer, tmp_path)
    multi = MultiAdapterModel(model, paths)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)  # the llama run uses the KV cache
    side = "left" if kind == "llama" else "right"
    # The new tokens only: a decoder-only model's output starts with its (differently padded) input otherwise.
    generated = multi.generate(**tokenize(tokenizer, TEXTS, side), adapter_names=ROW_ADAPTERS, new_tokens_only=True,
                               **options)
    for row, (text, name) in enumerate(zip(TEXTS, ROW_ADAPTERS)):
        expected = alone(kind, model, paths[name]).generate(**tokenizer([text], return_tensors="pt"),
                                                            new_tokens_only=True, **options)
        assert torch.equal(generated[row], expected[0]), f"row {row} ({name})"


def test_one_adapter_name_serves_the_whole_batch(t5_model, tokenizer, tmp_path):
    paths = save_adapters("t5", t5_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(t5_model, paths)
    batch = tokenize(tokenizer, TEXTS)
    by_string = logits("t5", multi, batch, adapter_names="short_prompt")
    by_list = logits("t5", multi, batch, adapter_names=["short_prompt"] * len(TEXTS))
    with torch.no_grad():
        single = logits("t5", alone("t5", t5_model, paths["short_prompt"]), batch)
    assert torch.equal(by_string, by_list)
    torch.testing.assert_close(by_string, single, **float32_paths(single))


def test_update_tables_hold_scaling_times_A_B_padded_with_zeros(t5_model, tokenizer, tmp_path):
    paths = save_adapters("t5", t5_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(t5_model, paths)
    bank = multi.model.prompt_encoder
    prompts, embedding_updates = bank.prompt_embeddings, bank.embedding_update()
    assert tuple(prompts.shape) == (4, 6, 32)  # the longest m
    assert tuple(embedding_updates.shape) == (4, 24, 32)  # the longest max_length
    for i, (name, sizes) in enumerate(ADAPTER_SIZES.items()):
        encoder = DePTModel.from_pretrained(t5_model, paths[name]).prompt_encoder  # the adapter alone
        m, r, s = sizes["num_virtual_tokens"], sizes["r"], sizes["max_length"]
        scaling = 8.0 / r**0.5 if r else 0.0
        expected = scaling * encoder.lora_embedding_A @ encoder.lora_embedding_B
        torch.testing.assert_close(embedding_updates[i, :s], expected, **float32_paths(expected))
        assert torch.count_nonzero(embedding_updates[i, s:]) == 0
        assert torch.equal(prompts[i, :m], encoder.prompt_embeddings)
        assert torch.count_nonzero(prompts[i, m:]) == 0


def test_decoder_only_labels_are_ignored_over_every_prompt_slot(llama_model, tokenizer, tmp_path):
    paths = save_adapters("llama", llama_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(llama_model, paths)
    batch = tokenize(tokenizer, TEXTS[:2], "left")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    names = ["long_prompt", "short_prompt"]
    mixed = multi(**batch, labels=labels, adapter_names=names)
    _, _, routing = multi.embed(names, **batch)
    prompted = routing.insert_prompt(labels, -100)
    assert (prompted != -100).sum() == (labels != -100).sum()
    # The batch loss is the mean over all label tokens: each row's loss alone, weighted by its label count.
    total, count = 0.0, 0
    for row, name in enumerate(names):
        single = alone("llama", llama_model, paths[name])
        row_batch = tokenizer(TEXTS[row:row + 1], return_tensors="pt")
        with torch.no_grad():
            loss = single(**row_batch, labels=row_batch["input_ids"]).loss
        shifted = single.insert_prompt(row_batch["input_ids"], row_batch["attention_mask"], -100)[:, 1:]
        total, count = total + loss * (shifted != -100).sum(), count + (shifted != -100).sum()
    expected = total / count
    torch.testing.assert_close(mixed.loss, expected, **float32_paths(expected))


def test_from_dept_models_equals_loading_from_directories(t5_model, tokenizer, tmp_path):
    paths = save_adapters("t5", t5_model, tokenizer, tmp_path)
    built = {name: DePTModel.from_pretrained(t5_model, path) for name, path in paths.items()}
    from_models = MultiAdapterModel.from_dept_models(built)
    from_dirs = MultiAdapterModel(base_model=t5_model, adapters=paths)
    assert isinstance(from_models.model, DePTModelForSeq2SeqLM)
    batch = tokenize(tokenizer, TEXTS)
    assert torch.equal(logits("t5", from_models, batch, adapter_names=ROW_ADAPTERS),
                       logits("t5", from_dirs, batch, adapter_names=ROW_ADAPTERS))


def test_from_dept_models_refuses_a_different_base(t5_model, tokenizer, tmp_path):
    paths = save_adapters("t5", t5_model, tokenizer, tmp_path)
    other_base = copy.deepcopy(t5_model)
    with torch.no_grad():
        other_base.shared.weight.add_(0.1)
    models = {"a": DePTModel.from_pretrained(t5_model, paths["long_prompt"]),
              "b": DePTModel.from_pretrained(other_base, paths["short_prompt"])}
    with pytest.raises(AdapterMismatchError, match="frozen weights differ"):
        MultiAdapterModel.from_dept_models(models)


def test_adapter_for_another_width_is_refused_on_load(t5_model, tokenizer, tmp_path):
    from transformers import T5ForConditionalGeneration

    from tests.conftest import tiny_t5_config

    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path / "narrow")
    wider = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), d_model=64))
    multi = MultiAdapterModel(wider)
    with pytest.raises(AdapterMismatchError, match="token_dim=32"):
        multi.add_adapter("narrow", tmp_path / "narrow")
    assert len(multi.adapters) == 0


def test_adapter_for_another_model_kind_is_refused(t5_model, llama_model, tokenizer, tmp_path):
    attach("t5", t5_model, tokenizer).save_pretrained(tmp_path / "t5")
    multi = MultiAdapterModel(llama_model)
    assert isinstance(multi.model, DePTModelForCausalLM)
    with pytest.raises((AdapterMismatchError, ConfigError)):
        multi.add_adapter("t5", tmp_path / "t5")


def test_unknown_adapter_name_lists_the_loaded_ones(t5_model, tokenizer, tmp_path):
    paths = save_adapters("t5", t5_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(t5_model, paths)
    batch = tokenize(tokenizer, TEXTS[:2])
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['sst2'\].*'long_prompt', 'prompt_tuning'"):
        logits("t5", multi, batch, adapter_names=["long_prompt", "sst2"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        logits("t5", multi, batch, adapter_names=["long_prompt"])


def test_loading_a_second_adapter_under_a_taken_name_is_refused(t5_model, tokenizer, tmp_path):
    paths = save_adapters("t5", t5_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(t5_model, {"a": paths["long_prompt"]})
    with pytest.raises(ValueError, match="already loaded"):
        multi.add_adapter("a", paths["short_prompt"])
    multi.remove_adapter("a")
    multi.add_adapter("a", paths["short_prompt"])
    assert multi.adapters["a"].num_virtual_tokens == 2


def test_each_row_is_checked_against_its_own_max_length(t5_model, tokenizer, tmp_path):
    paths = save_adapters("t5", t5_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(t5_model, paths)
    long_text = " ".join(["red"] * 18)  # 19 tokens: within 24, beyond short_prompt's 16
    batch = tokenize(tokenizer, [long_text, "red"])
    logits("t5", multi, batch, adapter_names=["long_prompt", "short_prompt"])
    with pytest.raises(InputTooLongError, match="Row 0 has 19 tokens but its adapter 'short_prompt'"):
        logits("t5", multi, batch, adapter_names=["short_prompt", "long_prompt"])


@pytest.mark.skipif(not OFFICIAL_CHECKPOINTS.is_dir(), reason="../shared/reference is absent")
def test_official_checkpoints_of_different_m_serve_one_batch(t5_base_dims_model):
    """cola (m=80, r=15) and sst2 (m=60, prompt only) from the official release, mixed in one batch."""
    paths = {task: OFFICIAL_CHECKPOINTS / task for task in ("cola", "sst2")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sst2 holds only the prompt
        multi = MultiAdapterModel(t5_base_dims_model, paths)
        singles = {task: alone("t5", t5_base_dims_model, path) for task, path in paths.items()}
    batch = {"input_ids": torch.tensor([[100, 200, 300, 1], [400, 500, 1, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    mixed = logits("t5", multi, batch, adapter_names=["sst2", "cola"])
    for row, task in enumerate(["sst2", "cola"]):
        real = batch["attention_mask"][row].bool()
        row_batch = {key: value[row:row + 1, real] for key, value in batch.items()}
        with torch.no_grad():
            expected = logits("t5", singles[task], row_batch)[0]
        # Trained prompts reach ~150 and logits ~500 here, so float32 rounding between batch shapes is ~1e-4
        # in absolute terms (as for one DePTModel, padded vs unpadded): compare relative to the logits' scale.
        torch.testing.assert_close(mixed[row], expected, atol=1e-6 * float(expected.abs().max()), rtol=0)
