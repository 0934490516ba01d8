"""Scoring and data rules that follow the official DePT code (ZhengxiangShi/DePT `train.py`, `src/tasks.py`)."""

from __future__ import annotations

import pytest

from dept_nlp.arguments import DataArguments
from dept_nlp.evaluation import TextEvaluator
from dept_nlp.tasks import get_task

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
