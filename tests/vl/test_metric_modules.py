"""The VL metrics as `evaluate` modules give the numbers of the functions they wrap (VQA accuracy, GQA/NLVR2
accuracy, BLEU-4, CIDEr-D), through `compute`, `add_batch`, `evaluate.combine` and a real `evaluator` run."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from dept_vl import metric_modules, metrics

# VQA questions whose scores need the official rules: normalisation only when the humans disagree, periods,
# commas between digits, number words, articles, contractions, and partial credit (1, 2, 3 of 10 humans).
VQA_PREDICTIONS = ["Two.", "Yes", "1,000", "dont", "the red", "cat", "", "none"]
VQA_ANSWERS = [
    ["2"] * 9 + ["3"],  # "Two." -> "2": 9 humans, full credit
    ["yes"] * 10,  # the humans agree: nothing is normalised, "Yes" scores 0
    ["1000"] * 2 + ["many"] * 8,  # "1,000" -> "1000": 2 humans, 0.6
    ["don't"] * 3 + ["no"] * 7,  # "dont" -> "don't": 3 humans, 0.9
    ["red"] + ["blue"] * 9,  # "the red" -> "red": 1 human, 0.3
    ["dog"] * 10,
    [""] * 4 + ["nothing"] * 6,  # an empty prediction matches empty answers
    ["0"] * 5 + ["zero"] * 5,  # "none" and "zero" both become "0"
]
CAPTIONS = ["A man rides a horse on the beach.", "two dogs play in the snow", "", "a red car"]
CAPTION_REFERENCES = [
    ["A man riding a horse on a beach.", "a person on a horse by the sea", "man rides horse along the shore"],
    ["Two dogs are playing in the snow.", "dogs play in snow"],
    ["a cat sleeps on a sofa"],
    ["a red car parked on the street", "a small red car", "a red vehicle on a road"],
]


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "evaluate")


def _in_batches(module, predictions, references, sizes):
    start = 0
    for size in sizes:
        module.add_batch(predictions=predictions[start:start + size], references=references[start:start + size])
        start += size
    assert start == len(predictions)
    return module.compute()


def test_the_vqa_module_gives_the_official_accuracy_in_one_call_and_in_batches(cache_dir):
    expected = metrics.vqa_accuracy(VQA_PREDICTIONS, VQA_ANSWERS)
    assert expected == pytest.approx(100 * (1 + 0 + 0.6 + 0.9 + 0.3 + 0 + 1 + 1) / 8)  # by hand
    vqa = metric_modules.load("vqa", cache_dir=cache_dir)
    assert vqa.compute(predictions=VQA_PREDICTIONS, references=VQA_ANSWERS) == {"accuracy": expected}
    assert _in_batches(vqa, VQA_PREDICTIONS, VQA_ANSWERS, [3, 1, 4]) == {"accuracy": expected}


def test_the_vqa_module_passes_the_normalization_option_to_the_function(cache_dir):
    always = metrics.vqa_accuracy(VQA_PREDICTIONS, VQA_ANSWERS, normalization="always")
    assert always > metrics.vqa_accuracy(VQA_PREDICTIONS, VQA_ANSWERS)  # "Yes" now matches ten "yes"
    vqa = metric_modules.load("vqa", cache_dir=cache_dir)
    assert vqa.compute(predictions=VQA_PREDICTIONS, references=VQA_ANSWERS, normalization="always") == {
        "accuracy": always}
    with pytest.raises(ValueError, match="normalization must be one of"):
        vqa.compute(predictions=VQA_PREDICTIONS, references=VQA_ANSWERS, normalization="lenient")


@pytest.mark.parametrize("task", ["gqa", "nlvr2"])
def test_the_gqa_and_nlvr2_modules_give_accuracy_after_strip_and_lower(task, cache_dir):
    predictions, references = ["True ", "false", "", "left", "Yes"], ["true", "true", "no", "left", "yes"]
    assert metrics.accuracy(predictions, references) == 60.0
    module = metric_modules.load(task, cache_dir=cache_dir)
    assert module.compute(predictions=predictions, references=references) == {"accuracy": 60.0}
    assert _in_batches(module, predictions, references, [2, 3]) == {"accuracy": 60.0}


def test_bleu4_and_cider_combined_give_caption_scores_in_one_call_and_in_batches(cache_dir):
    expected = metrics.caption_scores(CAPTIONS, CAPTION_REFERENCES)
    assert 0 < expected["bleu4"] < 100 and 0 < expected["cider"] < 1000  # no trivial case
    combined = evaluate.combine([metric_modules.load("bleu4", cache_dir=cache_dir), metric_modules.load("cider", cache_dir=cache_dir)])
    assert combined.compute(predictions=CAPTIONS, references=CAPTION_REFERENCES) == expected
    # CIDEr-D's document frequencies come from the whole corpus: batches must be scored together, not averaged.
    combined.add_batch(predictions=CAPTIONS[:1], references=CAPTION_REFERENCES[:1])
    combined.add_batch(predictions=CAPTIONS[1:], references=CAPTION_REFERENCES[1:])
    assert combined.compute() == expected
    assert metrics.bleu4_score(CAPTIONS, CAPTION_REFERENCES) == expected["bleu4"]
    assert metrics.cider_d_score(CAPTIONS, CAPTION_REFERENCES) == expected["cider"]


def test_the_modules_are_evaluate_metrics_with_features_and_citation(cache_dir):
    for name, references in (("vqa", "list"), ("gqa", "one"), ("nlvr2", "one"), ("bleu4", "list"), ("cider", "list")):
        module = metric_modules.load(name, cache_dir=cache_dir)
        assert module.name == name
        assert isinstance(module, evaluate.Metric)
        assert set(module.features) == {"predictions", "references"}
        assert isinstance(module.features["references"], Value) == (references == "one")
        assert module.citation.startswith("@inproceedings") and module.description


def test_bad_names_and_inputs_are_clear_errors(cache_dir):
    with pytest.raises(ValueError, match="No VL metric 'vqa_accuracy'; pick one of vqa, gqa"):
        metric_modules.load("vqa_accuracy")
    with pytest.raises(ValueError, match="no questions to score"):
        metric_modules.load("vqa", cache_dir=cache_dir).compute(predictions=[], references=[])
    with pytest.raises(ValueError, match=r"answers\[0\] is empty"):
        metric_modules.load("vqa", cache_dir=cache_dir).compute(predictions=["yes"], references=[[]])
    with pytest.raises(ValueError, match="Got a string but expected a list"):
        metric_modules.load("cider", cache_dir=cache_dir).compute(predictions=["a dog"], references=["a dog"])
    with pytest.raises(ValueError, match="no captions to score"):
        metric_modules.load("bleu4", cache_dir=cache_dir).compute(predictions=[], references=[])


def test_the_modules_load_and_score_with_the_network_cut(network_cut, cache_dir):
    combined = evaluate.combine([metric_modules.load(name, cache_dir=cache_dir) for name in ("vqa", "bleu4", "cider")])
    scores = combined.compute(predictions=CAPTIONS, references=CAPTION_REFERENCES)
    assert scores == {"accuracy": metrics.vqa_accuracy(CAPTIONS, CAPTION_REFERENCES),
                      **metrics.caption_scores(CAPTIONS, CAPTION_REFERENCES)}


def _constant_answer_classifier(answers: list[str], predicted: str, save_dir) -> str:
    """A tiny ViT whose classes are answers (VQA as answer classification) and which always predicts `predicted`,
    saved with its image processor so that the evaluator builds the pipeline from the directory."""
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, id2label=dict(enumerate(answers)),
                       label2id={answer: index for index, answer in enumerate(answers)})
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([float(answer == predicted) for answer in answers]))
    model.save_pretrained(save_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(save_dir)
    return str(save_dir)


def test_the_image_classification_evaluator_scores_a_pipeline_with_the_vqa_and_gqa_modules(tmp_path, cache_dir):
    model_dir = _constant_answer_classifier(["yes", "no", "2"], predicted="2", save_dir=tmp_path / "vit")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    human_answers = [["2"] * 10, ["two"] * 4 + ["2"] * 6, ["2"] * 2 + ["3"] * 8, ["yes"] * 10]
    data = Dataset.from_dict(
        {"image": images, "answers": human_answers, "answer": ["2", "two", "3", "yes"]},
        features=Features({"image": ImageFeature(), "answers": Sequence(Value("string")), "answer": Value("string")}))
    task_evaluator = evaluate.evaluator("image-classification")
    results = task_evaluator.compute(model_or_pipeline=model_dir, data=data, input_column="image",
                                     label_column="answers", metric=metric_modules.load("vqa", cache_dir=cache_dir),
                                     device=-1)
    # Every prediction is "2": 10 humans (1.0); "two" is normalised to "2" as the humans disagree (1.0);
    # 2 of 10 humans (0.6); no human (0).
    assert results["accuracy"] == pytest.approx(100 * (1 + 1 + 0.6 + 0) / 4)
    assert results["accuracy"] == metrics.vqa_accuracy(["2"] * 4, human_answers)
    results = task_evaluator.compute(model_or_pipeline=model_dir, data=data, input_column="image",
                                     label_column="answer", metric=metric_modules.load("gqa", cache_dir=cache_dir),
                                     device=-1)
    assert results["accuracy"] == 25.0 == metrics.accuracy(["2"] * 4, data["answer"])  # GQA: no normalisation
