"""Turn model outputs into the task's label words and score them: the text pipeline's `Evaluator`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dept_nlp import metrics
from dept_nlp.preprocess import seq2seq_target_ids
from dept_nlp.tasks import TaskSpec


@dataclass
class TextEvaluator:
    """Generates (seq2seq, causal) or takes the head's argmax (cls), decodes, and calls `metrics.compute`.

    MRQA with an encoder-decoder: the main `em`/`f1` score against the first answer as the official code sees
    it, i.e. its label ids (cut at `max_target_length` tokens) decoded back to text; the `*_max_over_answers`
    figures use every answer as written.
    """

    task: TaskSpec
    tokenizer: object
    family: str
    max_new_tokens: int = 20
    num_beams: int = 1
    greater_is_better: bool = True
    max_target_length: int = 20

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    @torch.no_grad()
    def predict_step(self, model, batch) -> list[str]:
        if self.family == "cls":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if self.task.is_regression:
                return [f"{value:.4f}" for value in logits[:, 0].float().tolist()]
            return [str(index) for index in logits.argmax(dim=-1).tolist()]
        inputs = batch["generation_inputs"] if self.family == "causal" else batch
        generated = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if self.family == "causal" and not getattr(model, "generate_returns_new_tokens_only", False):
            generated = generated[:, inputs["input_ids"].shape[1]:]  # HF returns the input, then the new tokens
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def official_target(self, target: str) -> str:
        """The target as the official metric sees it: its label ids decoded, special tokens skipped, stripped."""
        ids = seq2seq_target_ids(self.tokenizer, target, self.max_target_length)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def compute_metrics(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if not all(references):  # a split without labels: predict only, nothing to score
            return {}
        if self.task.is_extractive_qa:
            first = [self.official_target(refs[0]) for refs in references] if self.family == "seq2seq" else None
            return metrics.compute(self.task.name, predictions, references, first_answers=first)
        return metrics.compute(self.task.name, predictions, [refs[0] for refs in references])
