"""The prompt KV cache: P's keys and values computed once per adapter give the outputs of the full prompted
sequence, while the base model runs on the input tokens alone."""

import copy

import pytest
import torch

from dept import DePTModel, MultiAdapterModel
from dept.embedding import place, prompt_layout
from dept.prompt_cache import PromptStates, place_logits
from tests.conftest import attach, float32_paths
from tests.dept.conftest import ROW_ADAPTERS, save_adapters, tokenize

TEXTS = [
    "the movie was great",
    "a dull and boring film with terrible acting and actors",
    "red",
    "question: what color is the sky?",
    "sentence1: a man is playing a guitar .",
]
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def model_kind(model) -> str:
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


class FedLengths:
    """Records how many positions each call of the base model was fed (its prefill, then one per new token)."""

    def __init__(self, base_model):
        self.lengths = []
        self.handle = base_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        fed = kwargs.get("inputs_embeds")
        self.lengths.append((kwargs["input_ids"] if fed is None else fed).shape[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def labels_for(batch):
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def real_positions(dept_model, batch):
    """(batch, m + seq) bool: the prompt and the real tokens, where the logits mean something (not pads)."""
    _, mask = dept_model.embed(**batch)
    return mask.bool()


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_prompt_gives_the_logits_and_loss_of_the_full_sequence(causal_model, tokenizer, side, batch_size):
    dept_model = attach(model_kind(causal_model), causal_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS[1:1 + batch_size], side)
    with torch.no_grad():
        with FedLengths(dept_model.base_model) as fed:
            cached = dept_model(**batch, labels=labels_for(batch))
        full = dept_model(**batch, labels=labels_for(batch), use_prompt_cache=False)
    assert fed.lengths[-1] == batch["input_ids"].shape[1]  # the input alone: P came from the cache
    assert cached.logits.shape == full.logits.shape
    keep = real_positions(dept_model, batch)
    torch.testing.assert_close(cached.logits[keep], full.logits[keep], **float32_paths(full.logits[keep]))
    torch.testing.assert_close(cached.loss, full.loss, **float32_paths(full.loss))


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_prompt_generates_the_greedy_tokens_of_the_full_sequence(causal_model, tokenizer, side, batch_size):
    dept_model = attach(model_kind(causal_model), causal_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS[:batch_size], side)
    dept_model.generate(**tokenizer(["red"], return_tensors="pt"), max_new_tokens=1)  # computes P's states
    with FedLengths(dept_model.base_model) as fed:
        cached = dept_model.generate(**batch, **GREEDY)
    # P is not run again; the prefill runs on the input alone (transformers slices off the prompt's placeholder
    # slots), then one position per new token.
    assert fed.lengths == [batch["input_ids"].shape[1]] + [1] * (GREEDY["max_new_tokens"] - 1)
    full_kv = dept_model.generate(**batch, use_prompt_cache=False, **GREEDY)
    recomputed = dept_model.generate(**batch, use_cache=False, **GREEDY)  # the whole sequence at every step
    assert torch.equal(cached, full_kv)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_prompt_beam_search_matches_the_full_sequence(causal_model, tokenizer, side):
    dept_model = attach(model_kind(causal_model), causal_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS[:3], side)
    options = dict(GREEDY, num_beams=3, num_return_sequences=2)
    cached = dept_model.generate(**batch, **options)
    full = dept_model.generate(**batch, use_prompt_cache=False, **options)
    assert cached.shape[0] == 6
    assert torch.equal(cached, full)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_rows_get_their_adapters_cached_prompts(causal_model, tokenizer, tmp_path, side):
    """Adapters of m = 6, 2, 4 and 0 in one batch: each row's prompt slots beyond its m are masked."""
    kind = model_kind(causal_model)
    paths = save_adapters(kind, causal_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(causal_model, paths)
    batch = tokenize(tokenizer, TEXTS, side)
    # A row with m = 0 has nothing before its first token, whose label would be scored from a masked slot.
    labels = labels_for(batch)
    labels[torch.arange(len(TEXTS)), batch["attention_mask"].argmax(dim=1)] = -100
    with FedLengths(multi.base_model) as fed:
        multi(**batch, adapter_names=ROW_ADAPTERS)
        cached = multi(**batch, labels=labels, adapter_names=ROW_ADAPTERS)
    # Each adapter's prompt runs once, alone (m = 6, 2, 4; none for m = 0); each batch runs its input alone.
    assert fed.lengths == [6, 2, 4] + [batch["input_ids"].shape[1]] * 2
    full = multi(**batch, labels=labels, adapter_names=ROW_ADAPTERS, use_prompt_cache=False)
    _, mask, _ = multi.embed(ROW_ADAPTERS, **batch)
    expected = full.logits[mask.bool()]
    torch.testing.assert_close(cached.logits[mask.bool()], expected, **float32_paths(expected))
    torch.testing.assert_close(cached.loss, full.loss, **float32_paths(full.loss))
    for options in (dict(GREEDY, num_beams=2), GREEDY):
        generated = multi.generate(**batch, adapter_names=ROW_ADAPTERS, **options)
        assert torch.equal(generated, multi.generate(**batch, adapter_names=ROW_ADAPTERS, use_prompt_cache=False,
                                                     **options))
    if side == "right":
        return  # generate reads each row's last position, a pad for the shorter rows: only left padding
        # gives every row the tokens it would get alone (cached or not)
    for row, (text, name) in enumerate(zip(TEXTS, ROW_ADAPTERS)):  # each greedy row as its adapter alone
        alone = DePTModel.from_pretrained(copy.deepcopy(causal_model), paths[name])
        expected = alone.generate(**tokenizer([text], return_tensors="pt"), use_cache=False, new_tokens_only=True,
                                  **GREEDY)
        assert torch.equal(generated[row, batch["input_ids"].shape[1]:], expected[0]), f"row {row} ({name})"


# (leading pads per row, m per row, prompt slots, prompt_first): one adapter left- and right-padded, a bank whose
# rows have their own m (empty slots), and the classifiers' layout with P at position 0
LAYOUTS = {
    "one-left": ([3, 0, 5], [4, 4, 4], 4, False),
    "one-right": ([0, 0, 0], [4, 4, 4], 4, False),
    "bank-left": ([3, 0, 5], [4, 1, 0], 4, False),
    "bank-right": ([0, 0, 0], [2, 4, 0], 4, False),
    "prompt-first": ([3, 0, 5], [4, 1, 0], 4, True),
}


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_placed_logits_equal_the_gather_of_place(layout_name):
    """The copies of `place_logits` give exactly `dept.embedding.place`'s order, each row's prompt logits taken
    from its own row of the table (a bank) or from the one prompt repeated."""
    leading_pads, m, width, prompt_first = LAYOUTS[layout_name]
    seq, vocab = 9, 11
    attention_mask = torch.ones(len(m), seq, dtype=torch.long)
    for row, pads in enumerate(leading_pads):
        attention_mask[row, :pads] = 0
    layout = prompt_layout(attention_mask, torch.tensor(m), width, prompt_first)
    token_logits = torch.randn(len(m), seq, vocab)
    table = torch.randn(len(m), width, vocab)
    rows = torch.tensor([2, 0, 1])
    expected = place(table[rows], token_logits, layout)
    assert torch.equal(place_logits(PromptStates((), (), table, rows), token_logits, layout), expected)
    one_prompt = PromptStates((), (), table[:1]).select(len(m))  # one adapter: a view, no copy per row
    assert torch.equal(place_logits(one_prompt, token_logits, layout),
                       place(table[:1].expand(len(m), -1, -1), token_logits, layout))


def eval_logits(dept_model, batch, **kwargs):
    with torch.no_grad():
        return dept_model(**batch, **kwargs).logits[real_positions(dept_model, batch)]


def test_cache_is_recomputed_after_an_optimizer_step_on_the_prompt(causal_model, tokenizer):
    dept_model = attach(model_kind(causal_model), causal_model, tokenizer)
    batch = tokenize(tokenizer, TEXTS, "left")
    before = eval_logits(dept_model.eval(), batch)
    optimizer = torch.optim.AdamW(dept_model.optimizer_param_groups(learning_rate=0.3, lora_embedding_lr=1e-3))
    dept_model.train()
    dept_model(**batch, labels=labels_for(batch)).loss.backward()
    optimizer.step()
    after = eval_logits(dept_model.eval(), batch)
    assert not torch.allclose(after, before, atol=1e-3)
    expected = eval_logits(dept_model, batch, use_prompt_cache=False)
    torch.testing.assert_close(after, expected, **float32_paths(expected))


def test_cache_is_recomputed_after_loading_another_adapter(causal_model, tokenizer, tmp_path):
    kind = model_kind(causal_model)
    other = attach(kind, copy.deepcopy(causal_model), tokenizer, prompt_init="vocab", init_seed=7)
    other.save_pretrained(tmp_path / "other")
    dept_model = attach(kind, causal_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left")
    before = eval_logits(dept_model, batch)
    dept_model.load_adapter_state_dict(other.adapter_state_dict())
    loaded = DePTModel.from_pretrained(copy.deepcopy(causal_model), tmp_path / "other")
    after = eval_logits(dept_model, batch)
    assert not torch.allclose(after, before, atol=1e-3)
    expected = eval_logits(loaded, batch, use_prompt_cache=False)
    torch.testing.assert_close(after, expected, **float32_paths(expected))


def test_cache_is_recomputed_after_a_cast_of_the_model(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left")
    eval_logits(dept_model, batch)  # float32 states
    dept_model.double()
    cached = eval_logits(dept_model, batch)
    assert cached.dtype == torch.float64
    torch.testing.assert_close(cached, eval_logits(dept_model, batch, use_prompt_cache=False), atol=1e-10, rtol=0)


def test_mixed_batch_cache_follows_an_adapter_replaced_under_the_same_name(llama_model, tokenizer, tmp_path):
    paths = save_adapters("llama", llama_model, tokenizer, tmp_path)
    multi = MultiAdapterModel(llama_model, {"task": paths["long_prompt"]})
    batch = tokenize(tokenizer, TEXTS, "left")
    multi(**batch, adapter_names="task")
    multi.remove_adapter("task")
    multi.add_adapter("task", paths["short_prompt"])
    alone = DePTModel.from_pretrained(copy.deepcopy(llama_model), paths["short_prompt"])
    _, mask, _ = multi.embed("task", **batch)
    expected = eval_logits(alone, batch, use_prompt_cache=False)
    torch.testing.assert_close(multi(**batch, adapter_names="task").logits[mask.bool()], expected,
                               **float32_paths(expected))


def test_gradients_reach_the_prompt_in_eval_mode(llama_model, tokenizer):
    """With autograd on and P trainable the full sequence runs, so P gets its gradient."""
    dept_model = attach("llama", llama_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left")
    dept_model(**batch, labels=labels_for(batch)).loss.backward()
    assert dept_model.prompt_encoder.prompt_embeddings.grad.abs().sum() > 0


def test_hidden_states_asked_for_cover_the_prompt_too(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left")
    with torch.no_grad():
        output = dept_model(**batch, output_hidden_states=True)
    m, seq = dept_model.config.num_virtual_tokens, batch["input_ids"].shape[1]
    assert all(hidden.shape[1] == m + seq for hidden in output.hidden_states)


def test_generate_asked_for_hidden_states_runs_the_prompt_too(llama_model, tokenizer):
    dept_model = attach("llama", llama_model, tokenizer).eval()
    batch = tokenize(tokenizer, TEXTS, "left")
    output = dept_model.generate(**batch, max_new_tokens=2, return_dict_in_generate=True, output_hidden_states=True)
    m, seq = dept_model.config.num_virtual_tokens, batch["input_ids"].shape[1]
    assert output.hidden_states[0][0].shape[1] == m + seq  # the prefill's embeddings cover P and the input
