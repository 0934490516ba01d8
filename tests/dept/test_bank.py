"""The adapter bank: a bank of one is the single adapter, and each row of a bank of many is its adapter alone."""

import copy

import pytest
import torch

from dept import AdapterBank, DePTConfig, DePTEmbedding, MultiAdapterModel
from dept.embedding import PromptRouting
from tests.conftest import ADAPTER_SIZES, attach, float32_paths
from tests.dept.conftest import tokenize

TEXTS = ["the movie was great", "a dull and boring film with terrible acting and actors", "red circle"]

D = 8


def _single(sizes, seed):
    layer = DePTEmbedding(DePTConfig(prompt_init="random", init_seed=seed, **sizes), D)
    with torch.no_grad():
        layer.initialize(torch.randn(50, D, generator=torch.Generator().manual_seed(seed)))
        layer.lora_embedding_B.normal_(generator=torch.Generator().manual_seed(seed))  # a non-zero A @ B
    return layer


def _bank(singles: dict[str, DePTEmbedding]) -> AdapterBank:
    token_dim = next(iter(singles.values())).token_dim
    return AdapterBank.stack([(name, layer.config, layer.adapter_tensors()) for name, layer in singles.items()],
                             token_dim)


def _padded(lengths, side):
    seq = max(lengths)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, seq - length:] = 1
    return torch.randn(len(lengths), seq, D, generator=torch.Generator().manual_seed(7)), mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_each_row_of_a_mixed_bank_equals_its_adapter_alone(side):
    """Adapters of different m, r and max_length, r = 0 and m = 0, in one bank, rows mixed."""
    singles = {name: _single(sizes, seed) for seed, (name, sizes) in enumerate(ADAPTER_SIZES.items())}
    bank = _bank(singles)
    assert tuple(bank.prompt_embeddings.shape) == (4, 6, D)  # (n, m_max, d)
    assert tuple(bank.embedding_update().shape) == (4, 24, D)  # (n, s_max, d)
    names = list(ADAPTER_SIZES)
    rows = [0, 1, 2, 3, 1, 3]
    lengths = [5, 16, 1, 20, 3, 7]  # 16 is short_prompt's max_length, 20 update_only's
    embeds, mask = _padded(lengths, side)
    out, out_mask = bank(embeds, mask, torch.tensor(rows))
    for row, index in enumerate(rows):
        real = mask[row].bool()
        alone, alone_mask = singles[names[index]](embeds[row:row + 1, real])
        assert torch.equal(alone_mask[0], torch.ones(alone.shape[1], dtype=torch.long))
        assert int(out_mask[row].sum()) == alone.shape[1]  # the row's prompt slots beyond its m are masked
        torch.testing.assert_close(out[row, out_mask[row].bool()], alone[0], **float32_paths(alone[0]))


def test_a_bank_of_one_is_the_single_adapter_which_takes_the_fast_path():
    layer = _single(ADAPTER_SIZES["long_prompt"], seed=3)
    assert tuple(layer.prompt_embeddings.shape) == (6, D)  # no bank axis: the saved files' shapes
    embeds, mask = _padded([4, 9, 2], "left")
    routing = layer.route(mask)
    assert type(routing) is PromptRouting  # no adapter index: no gather, no per-row mask
    by_index = _bank({"same": layer})(embeds, mask, torch.zeros(3, dtype=torch.long))  # a bank of one
    plain = layer(embeds, mask)
    assert torch.equal(by_index[0], plain[0]) and torch.equal(by_index[1], plain[1])
    # The same adapter inside a bank of two (gather path) gives the same rows.
    bank = _bank({"other": _single(ADAPTER_SIZES["short_prompt"], seed=4), "same": layer})
    banked, banked_mask = bank(embeds, mask, torch.ones(3, dtype=torch.long))
    assert torch.equal(banked_mask, plain[1])
    torch.testing.assert_close(banked, plain[0], **float32_paths(plain[0]))


def test_a_bank_initialises_each_adapter_as_it_would_alone():
    table = torch.randn(50, D, generator=torch.Generator().manual_seed(0))
    configs = [DePTConfig(prompt_init="vocab", init_seed=seed, **sizes)
               for seed, sizes in enumerate(ADAPTER_SIZES.values())]
    bank = AdapterBank(configs, D, names=list(ADAPTER_SIZES))
    bank.initialize(table)
    for index, config in enumerate(configs):
        alone = DePTEmbedding(config, D)
        alone.initialize(table)
        for key, tensor in bank.adapter_tensors(index).items():
            assert torch.equal(tensor, alone.adapter_tensors()[key]), (config, key)


def _loss_and_logits(kind, model, batch, **names):
    labels = {"t5": batch["input_ids"][:, :3].contiguous(), "bert": torch.tensor([0, 1, 1])[: len(batch["input_ids"])],
              "llama": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}[kind]
    output = model(**batch, labels=labels, **names)
    logits = output.logits
    if kind == "llama":  # the real tokens' logits (the bank has more prompt slots than this adapter)
        _, mask = model.embed(batch["input_ids"], batch["attention_mask"], **names)
        logits = torch.cat([row[keep.bool()] for row, keep in zip(logits, mask)])
    return output.loss, logits


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_bank_of_one_gives_the_single_adapters_outputs_and_gradients_in_every_bank(any_model, tokenizer, side):
    """The trained adapter alone (bank of one, fast path) and inside a bank of two (gather and mask path), next
    to an adapter with a longer prompt: same outputs and same gradients for P, A and B, for each model kind."""
    kind, model = any_model
    single = attach(kind, model, tokenizer, num_virtual_tokens=3, r=2, max_length=24)
    single.train()
    other = DePTEmbedding(DePTConfig(num_virtual_tokens=6, r=4, max_length=20, prompt_init="random"), 32)
    banked = MultiAdapterModel(copy.deepcopy(single.base_model)).model  # the serving model of this kind
    banked.prompt_encoder = _bank({"other": other, "trained": single.prompt_encoder}).requires_grad_(True)
    banked.train()
    batch = tokenize(tokenizer, TEXTS[:3], side)
    loss, logits = _loss_and_logits(kind, single, batch)
    banked_loss, banked_logits = _loss_and_logits(kind, banked, batch, adapter_names="trained")
    torch.testing.assert_close(banked_logits, logits, **float32_paths(logits))
    torch.testing.assert_close(banked_loss, loss, **float32_paths(loss))
    loss.backward()
    banked_loss.backward()
    for key, tensor in single.prompt_encoder.adapter_tensors().items():
        bank_grad = banked.prompt_encoder.adapter_tensors(1)[key]
        grad = getattr(banked.prompt_encoder, key).grad[1][tuple(slice(0, n) for n in tensor.shape)]
        assert tensor.grad is not None and bank_grad.shape == tensor.shape
        torch.testing.assert_close(grad, tensor.grad, **float32_paths(tensor.grad), msg=key)
    assert torch.count_nonzero(banked.prompt_encoder.prompt_embeddings.grad[0]) == 0  # no row uses "other"
