"""The vision-language metrics as Hugging Face `evaluate` modules, built here: no hub fetch, no network.

    >>> from dept_vl import metric_modules
    >>> vqa = metric_modules.load("vqa")
    >>> vqa.compute(predictions=["Two.", "yes"], references=[["2"] * 9 + ["3"], ["yes"] * 10])
    {'accuracy': 100.0}

Each module is an `evaluate.Metric`, so `add`, `add_batch`, `compute`, `evaluate.combine` and the `evaluator` API
work as with a module from the hub. Its `_compute` calls `dept_vl.metrics`, where the math lives:

- "vqa": the official VQA accuracy (`vqa_accuracy`); `compute(..., normalization="always")` picks that option;
- "gqa", "nlvr2": accuracy after strip and lower-case (`accuracy`);
- "bleu4", "cider": BLEU-4 and CIDEr-D of captions (`bleu4_score`, `cider_d_score`); the two combined give
  `caption_scores`.

All are x100. Predictions are strings; VQA and caption references are each example's list of human answers or
captions, GQA and NLVR2 references one answer each.
"""

from __future__ import annotations

import datasets
import evaluate

from dept_vl import metrics

_VQA_CITATION = """\
@inproceedings{goyal2017vqa2,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR},
  year={2017}
}"""
_GQA_CITATION = """\
@inproceedings{hudson2019gqa,
  title={{GQA}: A New Dataset for Real-World Visual Reasoning and Compositional Question Answering},
  author={Hudson, Drew A. and Manning, Christopher D.},
  booktitle={CVPR},
  year={2019}
}"""
_NLVR2_CITATION = """\
@inproceedings{suhr2019nlvr2,
  title={A Corpus for Reasoning about Natural Language Grounded in Photographs},
  author={Suhr, Alane and Zhou, Stephanie and Zhang, Ally and Zhang, Iris and Bai, Huajun and Artzi, Yoav},
  booktitle={ACL},
  year={2019}
}"""
_BLEU_CITATION = """\
@inproceedings{papineni2002bleu,
  title={{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL},
  year={2002}
}"""
_CIDER_CITATION = """\
@inproceedings{vedantam2015cider,
  title={{CIDEr}: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR},
  year={2015}
}"""

_VQA_INPUTS = """
Args:
    predictions (`list` of `str`): one predicted answer per question.
    references (`list` of `list` of `str`): per question, the answers of all its annotators (10 in VQA v2).
    normalization (`str`, compute only): "official" (default: normalise only when the humans disagree) or "always".
Returns:
    accuracy: the official VQA accuracy, x100.
"""
_ACCURACY_INPUTS = """
Args:
    predictions (`list` of `str`): one predicted answer per example.
    references (`list` of `str`): the gold answer of each example.
Returns:
    accuracy: exact match after strip and lower-case, x100.
"""
_CAPTION_INPUTS = """
Args:
    predictions (`list` of `str`): one generated caption per image.
    references (`list` of `list` of `str`): per image, its human captions (5 in COCO Karpathy test).
Returns:
    {key}: corpus {name} after the PTB-style tokenisation of `dept_vl.caption_eval`, x100.
"""


_STRING = datasets.Value("string")
_STRINGS = datasets.Sequence(datasets.Value("string"))


def _features(references: datasets.Value | datasets.Sequence) -> datasets.Features:
    return datasets.Features({"predictions": _STRING, "references": references})


class Vqa(evaluate.Metric):
    """The official VQA accuracy (GT-Vision-Lab's `vqaEval.py`): min(1, #other humans who gave the answer / 3)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="VQA accuracy exactly as the official vqaEval.py computes it (dept_vl.vqa_eval).",
            citation=_VQA_CITATION,
            inputs_description=_VQA_INPUTS,
            features=_features(_STRINGS),
            codebase_urls=["https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(self, predictions, references, normalization: str = "official") -> dict[str, float]:
        return {"accuracy": metrics.vqa_accuracy(predictions, references, normalization=normalization)}


class Gqa(evaluate.Metric):
    """GQA accuracy: exact match after strip and lower-case."""

    _task = "GQA"
    _citation = _GQA_CITATION

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=f"{self._task} accuracy: exact match after strip and lower-case (dept_vl.metrics).",
            citation=self._citation,
            inputs_description=_ACCURACY_INPUTS,
            features=_features(_STRING),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {"accuracy": metrics.accuracy(predictions, references)}


class Nlvr2(Gqa):
    """NLVR2 accuracy ("true"/"false"): exact match after strip and lower-case."""

    _task = "NLVR2"
    _citation = _NLVR2_CITATION


class Bleu4(evaluate.Metric):
    """Corpus BLEU-4 of captions, as pycocoevalcap's `Bleu(4)`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="COCO caption BLEU-4, as pycocoevalcap computes it (dept_vl.caption_eval).",
            citation=_BLEU_CITATION,
            inputs_description=_CAPTION_INPUTS.format(key="bleu4", name="BLEU-4 in [0, 100]"),
            features=_features(_STRINGS),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {"bleu4": metrics.bleu4_score(predictions, references)}


class Cider(evaluate.Metric):
    """Corpus CIDEr-D of captions, as pycocoevalcap's `Cider` (document frequencies from this corpus)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="COCO caption CIDEr-D, as pycocoevalcap computes it (dept_vl.caption_eval).",
            citation=_CIDER_CITATION,
            inputs_description=_CAPTION_INPUTS.format(key="cider", name="CIDEr-D in [0, 1000]"),
            features=_features(_STRINGS),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {"cider": metrics.cider_d_score(predictions, references)}


def load(name: str, **module_kwargs) -> evaluate.EvaluationModule:
    """One of these metrics as an `evaluate.EvaluationModule`, built locally: no hub fetch, works offline.

    Args:
        name: "vqa" (the official VQA accuracy), "gqa" or "nlvr2" (accuracy), "bleu4" or "cider" (COCO captions).
        module_kwargs: `evaluate.EvaluationModule`'s own (`cache_dir`, `keep_in_memory`, `num_process`,
            `process_id`, `experiment_id`, ...).

    >>> load("gqa").compute(predictions=["Yes ", "no"], references=["yes", "left"])
    {'accuracy': 50.0}
    """
    modules = {"vqa": Vqa, "gqa": Gqa, "nlvr2": Nlvr2, "bleu4": Bleu4, "cider": Cider}
    if name not in modules:
        raise ValueError(f"No VL metric {name!r}; pick one of vqa, gqa, nlvr2, bleu4, cider.")
    return modules[name](**module_kwargs)
