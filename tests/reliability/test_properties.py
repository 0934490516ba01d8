"""Properties that must hold for any input (hypothesis): padding invariance, metric bounds and order invariance,
and task formatting that never drops a field.

The VL metric properties (bounds, order invariance, idempotent VQA answer normalisation) are in
tests/vl/test_metric_properties.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM, T5ForConditionalGeneration

from dept_nlp.metrics import compute
from dept_nlp.tasks import TASKS, ColumnType, get_task, pad_punctuation, remove_markup
from tests.conftest import CORPUS, attach, build_word_tokenizer, dept_forward, tiny_llama_config, tiny_t5_config

PAD_ID, EOS_ID = 0, 1

# ---------------------------------------------------------------------------------------------------------------
# Padding invariance: an example's logits do not depend on its batch, its padding or the padding side.


@functools.cache
def _dept_model(kind: str):
    """One tiny DePT model per kind for the whole module (hypothesis reruns the test body many times)."""
    tokenizer = build_word_tokenizer(CORPUS)
    torch.manual_seed(0)
    base = {
        "t5": lambda: T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))),
        "llama": lambda: LlamaForCausalLM(tiny_llama_config(len(tokenizer))),
    }[kind]()
    model = attach(kind, base.eval(), tokenizer, max_length=16)
    model.requires_grad_(False)
    return model.eval(), len(tokenizer)


def _batch(sequences: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    longest = max(map(len, sequences))
    ids, mask = [], []
    for sequence in sequences:
        pads = longest - len(sequence)
        ids.append([PAD_ID] * pads + sequence if side == "left" else sequence + [PAD_ID] * pads)
        mask.append([0] * pads + [1] * len(sequence) if side == "left" else [1] * len(sequence) + [0] * pads)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def _real_logits(kind: str, model, sequences: list[list[int]], side: str) -> list[torch.Tensor]:
    """Each example's logits, at its real positions only for the decoder-only model."""
    batch = _batch(sequences, side)
    logits = dept_forward(kind, model, batch)
    if kind == "t5":  # decoder logits: one row per example, no padding in them
        return list(logits)
    keep = model.insert_prompt(batch["attention_mask"], batch["attention_mask"], 1).bool()
    return [row[mask] for row, mask in zip(logits, keep)]


def token_sequences(vocab_size: int):
    words = st.lists(st.integers(4, vocab_size - 1), min_size=1, max_size=14)
    return st.lists(words.map(lambda ids: ids + [EOS_ID]), min_size=1, max_size=4)


@pytest.mark.parametrize("kind", ["t5", "llama"])
@settings(max_examples=15, deadline=None)
@given(data=st.data(), side=st.sampled_from(["right", "left"]))
def test_padding_invariance_holds_for_random_lengths_batches_and_sides(kind, data, side):
    model, vocab_size = _dept_model(kind)
    sequences = data.draw(token_sequences(vocab_size))
    with torch.no_grad():
        batched = _real_logits(kind, model, sequences, side)
        for sequence, in_batch in zip(sequences, batched):
            alone = _real_logits(kind, model, [sequence], "right")[0]
            torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)  # logits reach ~15


# ---------------------------------------------------------------------------------------------------------------
# Metrics: bounded, and the same for any order of the examples

CORRELATIONS = {"matthews_correlation", "pearson", "spearmanr"}  # these run from -100 to 100
JUNK = st.sampled_from(["", "yes", "2.5", "-1", " 1 ", "banana", "0.0"])


def _examples(task_name: str):
    task = get_task(task_name)
    if task.is_extractive_qa:
        answer = st.text(alphabet="abc ,.", max_size=8)
        return st.lists(st.tuples(answer, st.lists(answer, min_size=1, max_size=3)), min_size=1, max_size=12)
    if task.is_regression:
        score = st.floats(0, 5).map(lambda value: str(round(value, 1)))
        return st.lists(st.tuples(st.one_of(score, JUNK), score), min_size=1, max_size=12)
    word = st.sampled_from(task.label_words)
    return st.lists(st.tuples(st.one_of(word, JUNK), word), min_size=1, max_size=12)


@pytest.mark.parametrize("task_name", ["sst2", "cola", "mrpc", "superglue-cb", "superglue-multirc", "stsb", "nq"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_text_metrics_are_bounded_and_ignore_example_order(task_name, data):
    examples = data.draw(_examples(task_name))
    order = data.draw(st.permutations(range(len(examples))))
    scores = compute(task_name, [p for p, _ in examples], [r for _, r in examples])
    shuffled = compute(task_name, [examples[i][0] for i in order], [examples[i][1] for i in order])
    extra = {"em_max_over_answers", "f1_max_over_answers"} if get_task(task_name).is_extractive_qa else set()
    assert set(scores) == set(get_task(task_name).metric_names) | extra
    if extra:  # the first answer is one of the answers
        assert scores["em"] <= scores["em_max_over_answers"] and scores["f1"] <= scores["f1_max_over_answers"]
    for name, value in scores.items():
        low = -100.0 if name in CORRELATIONS else 0.0
        assert low - 1e-9 <= value <= 100.0 + 1e-9, (name, value)
        assert shuffled[name] == pytest.approx(value, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Formatting never drops a field

_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=20).filter(
    lambda text: text.strip() != ""
)
_WORD = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Z")), min_size=1, max_size=8)


def _shown(task_name: str, column: str, value: str) -> str:
    """How a column's value appears in the source: MRQA pads punctuation, MultiRC drops its HTML markup."""
    if get_task(task_name).is_extractive_qa:
        return pad_punctuation(value)
    if task_name == "superglue-multirc":
        return remove_markup(value)
    return value


@st.composite
def _hub_row(draw, task_name: str) -> dict:
    task = get_task(task_name)
    if task_name == "superglue-wsc.fixed":
        words = draw(st.lists(_WORD, min_size=2, max_size=8))
        first, second = draw(st.lists(st.integers(0, len(words) - 1), min_size=2, max_size=2, unique=True))
        row = {"text": " ".join(words), "span1_text": words[first], "span1_index": first,
               "span2_text": words[second], "span2_index": second}
    else:
        row = {column: draw(_TEXT) for column, kind in task.schema.items() if kind is ColumnType.TEXT}
    if task.is_extractive_qa:
        row[task.answers_column] = draw(st.lists(_TEXT, min_size=1, max_size=3))
    elif task.is_regression:
        row[task.label_column] = draw(st.floats(*task.score_range))
    else:
        row[task.label_column] = draw(st.sampled_from(task.raw_labels))
    return row


@pytest.mark.parametrize("task_name", sorted(TASKS))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_formatting_keeps_every_input_field_in_the_source(task_name, data):
    task = get_task(task_name)
    row = data.draw(_hub_row(task_name))
    formatted = task.to_row(row)
    source = formatted["source"]
    if task_name == "superglue-wsc.fixed":  # every word stays, the noun between *, the pronoun between #
        marks = {row["span1_index"]: "*", row["span2_index"]: "#"}
        expected = [piece for index, word in enumerate(row["text"].split())
                    for piece in ([marks[index], word, marks[index]] if index in marks else [word])]
        assert source.removeprefix("text: ").split() == expected
    else:
        position = 0
        for column in task.schema:  # each value appears, in the schema's order
            shown = _shown(task_name, column, row[column])
            found = source.find(shown, position)
            assert found >= 0, (column, shown, source)
            position = found + len(shown)
    if task.is_extractive_qa:
        assert formatted["references"] == [pad_punctuation(answer) for answer in row["answers"]]
    elif task.is_regression:
        assert float(formatted["target"]) == pytest.approx(row[task.label_column], abs=0.05 + 1e-9)
    else:
        assert formatted["target"] == str(task.raw_labels.index(row[task.label_column]))
