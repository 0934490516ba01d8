"""Scoring and data rules that follow the official DePT code (ZhengxiangShi/DePT `train.py`, `src/tasks.py`)."""

from __future__ import annotations

import datasets
import pytest
import torch

from dept_nlp.arguments import DataArguments
from dept_nlp.data_files import sample_sst2_files
from dept_nlp.evaluate import TextEvaluator
from dept_nlp.pipeline import load_splits
from dept_nlp.preprocess import tokenize_rows
from dept_nlp.tasks import get_task
from tests.conftest import build_word_tokenizer, hub_dataset_dict

# Words of the test vocabulary, one token each, none an article (SQuAD normalisation drops a/an/the).
WORDS = "movie was great and actors were wonderful dull boring film with terrible acting sky blue today".split()


def test_mrqa_main_metric_scores_the_first_answer_cut_at_20_tokens_as_the_official_labels(tokenizer):
    words = WORDS + WORDS[:9]
    long_answer = " ".join(words)  # 25 words; + eos = 26 label ids
    cut = " ".join(words[:19])  # the official label: 19 words + eos = 20 ids
    evaluator = TextEvaluator(get_task("nq"), tokenizer, "seq2seq")
    assert evaluator.official_target(long_answer) == cut
    # The prediction is the truncated label: the official em and f1 are 1; against the answer as written, the
    # best F1 is P = 19/19, R = 19/25. The second example matches its second answer only.
    scores = evaluator.compute_metrics([cut, "great"], [[long_answer, "film"], ["movie", "great"]])
    assert scores == pytest.approx({"em": 50.0, "f1": 100 * (1 + 0) / 2, "em_max_over_answers": 50.0,
                                    "f1_max_over_answers": 100 * (2 * (19 / 19) * (19 / 25) / (1 + 19 / 25) + 1) / 2})


def test_targets_and_generation_are_cut_at_20_tokens_by_default():
    args = DataArguments(task_name="nq", do_eval=True)
    assert (args.max_target_length, args.generation_max_length) == (20, 20)


def _causal_tokens(template: str | None = None):
    tokenizer = build_word_tokenizer(["sentence: a good movie Label : 1 0 question answer"])
    rows = datasets.Dataset.from_list([{"source": "sentence: a good movie", "target": "1", "label": 1,
                                        "references": ["1"]}])
    extra = {} if template is None else {"causal_template": template}
    row = tokenize_rows(rows, tokenizer, "causal", 64, **extra)[0]
    return tokenizer, row


def test_decoder_only_inputs_use_the_official_label_template_by_default():
    tokenizer, row = _causal_tokens()
    # The official decoder_preprocess_function: f"{source} Label : " then the target (the word tokenizer lowers).
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == [
        "<s>", "sentence", ":", "a", "good", "movie", "label", ":", "1", "</s>"]
    assert row["labels"] == [-100] * 8 + row["input_ids"][8:]  # loss on the target and eos only
    assert row["prompt_input_ids"] == row["input_ids"][:8]  # generation starts after "Label : "


def test_decoder_only_template_can_be_set_and_a_bad_one_is_refused():
    tokenizer, row = _causal_tokens("question {source} answer")
    assert tokenizer.convert_ids_to_tokens(row["prompt_input_ids"]) == [
        "<s>", "question", "sentence", ":", "a", "good", "movie", "answer"]
    with pytest.raises(ValueError, match=r"must contain \{source\} exactly once"):
        _causal_tokens("no placeholder")
    with pytest.raises(ValueError, match="causal_template"):
        DataArguments(task_name="rte", do_eval=True, causal_template="{input} Label : ")


def _official_subsample(sources: list[str], n: int) -> list[str]:
    # The official `subsample`: the first n of torch.randperm(len) with a generator seeded with 42, in that order.
    order = torch.randperm(len(sources), generator=torch.Generator().manual_seed(42)).tolist()
    return [sources[i] for i in order[:n]]


def test_max_samples_flags_draw_a_seed_42_random_subset_of_each_split_as_the_official_code():
    files = sample_sst2_files()
    full = load_splits(DataArguments(task_name="sst2", do_train=True, do_predict=True, **files), seed=0)
    args = DataArguments(task_name="sst2", do_train=True, do_predict=True, max_train_samples=5, max_eval_samples=4,
                         max_predict_samples=3, **files)
    cut = load_splits(args, seed=0)
    for split, n in (("train", 5), ("validation", 4), ("test", 3)):
        assert cut[split]["source"] == _official_subsample(full[split]["source"], n), split
    assert cut["train"]["source"] != full["train"]["source"][:5]  # not the first rows


def test_max_eval_samples_of_a_halved_hub_split_takes_its_first_rows_in_the_official_order(monkeypatch):
    # A small task's validation is already the first half of randperm(hub validation, 42): the official
    # subsample(dataset, n_obs, indices) takes the first n_obs of those same indices.
    hub = hub_dataset_dict("rte", {"train": 4, "validation": 20})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, split, **kwargs: hub[split])
    full = load_splits(DataArguments(task_name="rte", do_eval=True), seed=0)["validation"]["source"]
    cut = load_splits(DataArguments(task_name="rte", do_eval=True, max_eval_samples=3), seed=0)
    assert cut["validation"]["source"] == full[:3]
