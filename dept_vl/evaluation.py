"""Generate answers and captions with VL-T5 and score each task with its own metric: the VL `Evaluator`.

Metrics are named `<task>_<metric>` (`vqa_accuracy`, `nlvr_consistency`, `caption_cider`, ...); VQA adds the
official per-answer-type accuracy (`vqa_accuracy_yes_no`, `vqa_accuracy_number`, `vqa_accuracy_other`). The trainer
prefixes them with the split (`eval_vqa_accuracy`). With several tasks, `average` is the mean of each task's
main metric and is the main metric of the run (VL-Adapter's multitask score).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from dept_vl import metrics
from dept_vl.tasks import TASKS

VISUAL_INPUTS = ("vis_feats", "vis_boxes", "vis_attention_mask", "pixel_values")  # pixels: a ViT inside the model


def answer_type_key(answer_type: str) -> str:
    """A VQA answer type as a metric-name suffix: "yes/no" -> "yes_no" (so `vqa_accuracy_yes_no`)."""
    return "_".join(answer_type.replace("/", " ").split())


def score_task(task: str, predictions: list[str], references: list[dict]) -> dict[str, float]:
    """The metrics of one task, without prefix, e.g. {"accuracy": 71.3, "consistency": 40.0} for NLVR2."""
    answers = [reference["answers"] for reference in references]
    if task == "vqa":
        scores = {"accuracy": metrics.vqa_accuracy(predictions, answers)}
        types = [reference.get("answer_type") or "" for reference in references]
        if all(types):  # the official per-answer-type accuracy, when the annotations name the types
            per_type = metrics.vqa_accuracy_per_answer_type(predictions, answers, types)
            scores.update({f"accuracy_{answer_type_key(name)}": value for name, value in per_type.items()})
        return scores
    if task == "gqa":
        return {"accuracy": metrics.accuracy(predictions, [a[0] for a in answers])}
    if task == "nlvr":
        labels = [a[0] for a in answers]
        groups = [metrics.nlvr_sentence_id(reference["example_id"]) for reference in references]
        return {"accuracy": metrics.accuracy(predictions, labels),
                "consistency": metrics.nlvr_consistency(predictions, labels, groups)}
    if task == "caption":
        return metrics.caption_scores(predictions, answers)
    raise ValueError(f"Unknown task {task!r}: choose from {sorted(TASKS)}.")


@dataclass
class VLEvaluator:
    """Generates with beam search (`num_beams`) and scores every task of the batch rows with its own metric.

    Args:
        task_names: the tasks the evaluation sets hold.
        tokenizer: decodes the generated ids.
        max_new_tokens: longest answer or caption generated.
        num_beams: 1 is greedy decoding.
    """

    task_names: list[str]
    tokenizer: object
    max_new_tokens: int = 20
    num_beams: int = 1
    greater_is_better: bool = True

    @property
    def main_metric(self) -> str:
        if len(self.task_names) > 1:
            return "average"
        task = self.task_names[0]
        return f"{task}_{TASKS[task].main_metric}"

    @torch.no_grad()
    def predict_step(self, model, batch: dict) -> list[str]:
        """Decoded generations, one per row. `batch` holds the collated tensors (labels are ignored)."""
        visual = {key: batch[key] for key in VISUAL_INPUTS if key in batch}
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **visual,
            max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def compute_metrics(self, predictions: list[str], references: list[dict]) -> dict[str, float]:
        """Per-task metrics `<task>_<metric>`, plus `average` over the tasks' main metrics when there are several.

        Rows without gold answers (unlabelled test data) are predicted but not scored.
        """
        by_task: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for prediction, reference in zip(predictions, references, strict=True):
            if reference["answers"]:
                by_task[reference["task"]][0].append(prediction)
                by_task[reference["task"]][1].append(reference)
        results: dict[str, float] = {}
        for task, (task_predictions, task_references) in by_task.items():
            for name, value in score_task(task, task_predictions, task_references).items():
                results[f"{task}_{name}"] = value
        if len(self.task_names) > 1 and by_task:
            mains = [results[f"{task}_{TASKS[task].main_metric}"] for task in self.task_names if task in by_task]
            results["average"] = sum(mains) / len(mains)
        return results
