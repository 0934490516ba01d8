import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import synthetic_vl_data

COLORS, SHAPE_RADIUS = synthetic_vl_data.COLORS, synthetic_vl_data.SHAPE_RADIUS
Scene, SceneObject = synthetic_vl_data.Scene, synthetic_vl_data.SceneObject
make_synthetic_vl_dataset, render_scene = synthetic_vl_data.make_synthetic_vl_dataset, synthetic_vl_data.render_scene
shape_center = synthetic_vl_data.shape_center

N_IMAGES = 40


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    files = make_synthetic_vl_dataset(root, n_images=N_IMAGES, seed=0)
    scenes = json.loads(files["scenes"].read_text())
    return root, files, scenes


def _nearest_color(pixel) -> str:
    return min(COLORS, key=lambda name: np.abs(np.array(COLORS[name]) - pixel).sum())


def _pixel_at(image_path: Path, position: str) -> np.ndarray:
    pixels = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    x, y = shape_center(position, pixels.shape[1])
    return pixels[int(y), int(x)]


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    first = make_synthetic_vl_dataset(tmp_path / "a", n_images=12, seed=3)
    second = make_synthetic_vl_dataset(tmp_path / "b", n_images=12, seed=3)
    other = make_synthetic_vl_dataset(tmp_path / "c", n_images=12, seed=4)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 36
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    assert first.keys() == second.keys() == other.keys()
    assert first["scenes"].read_text() != other["scenes"].read_text()


def test_refuses_to_write_into_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_synthetic_vl_dataset(tmp_path, n_images=10)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_rendered_shapes_have_their_colour_and_outline():
    scene = Scene(
        (
            SceneObject("circle", "red", "left"),
            SceneObject("square", "blue", "top"),
            SceneObject("triangle", "green", "right"),
        )
    )
    size = 96
    pixels = np.asarray(render_scene(scene, size)).astype(int)
    radius = SHAPE_RADIUS * size

    def at(position, dx, dy):
        x, y = shape_center(position, size)
        return tuple(pixels[int(y + dy * radius), int(x + dx * radius)])

    for obj in scene.objects:
        assert at(obj.position, 0, 0) == COLORS[obj.color]
    # Corners of the bounding square tell the outlines apart: only the square fills its top-left corner, the
    # triangle (apex up) fills its bottom-right corner, the circle neither.
    assert at("top", -0.8, -0.8) == COLORS["blue"] and at("top", 0.8, 0.8) == COLORS["blue"]
    assert at("right", -0.8, -0.8) == (255, 255, 255) and at("right", 0.8, 0.8) == COLORS["green"]
    assert at("left", -0.8, -0.8) == (255, 255, 255) and at("left", 0.8, 0.8) == (255, 255, 255)
    assert at("bottom", 0, 0) == (255, 255, 255)  # the empty place stays background


def test_vqa_files_follow_the_official_schema(dataset):
    root, files, _ = dataset
    for subset in ("train", "val"):
        questions = json.loads(files[f"vqa_{subset}_questions"].read_text())
        annotations = json.loads(files[f"vqa_{subset}_annotations"].read_text())
        assert files[f"vqa_{subset}_questions"].name == f"v2_OpenEnded_mscoco_{subset}2014_questions.json"
        assert files[f"vqa_{subset}_annotations"].name == f"v2_mscoco_{subset}2014_annotations.json"
        assert questions["data_subtype"] == annotations["data_subtype"] == f"{subset}2014"
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
        assert len(by_id) == len(questions["questions"]) > 0
        for question in questions["questions"]:
            assert set(question) == {"image_id", "question", "question_id"}
            annotation = by_id[question["question_id"]]
            assert set(annotation) == {
                "question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers"
            }  # fmt: skip
            assert annotation["image_id"] == question["image_id"]
            assert annotation["answer_type"] in {"yes/no", "number", "other"}
            answers = annotation["answers"]
            assert [a["answer_id"] for a in answers] == list(range(1, 11))
            assert all(a["answer_confidence"] in {"yes", "maybe", "no"} for a in answers)
            most_common, count = Counter(a["answer"] for a in answers).most_common(1)[0]
            assert annotation["multiple_choice_answer"] == most_common and count >= 6
            image = files["coco_images"] / f"{subset}2014" / f"COCO_{subset}2014_{question['image_id']:012d}.jpg"
            assert image.is_file()


def test_vqa_annotators_disagree_in_form_as_real_ones_do(dataset):
    _, files, _ = dataset
    pairs = Counter()
    for subset in ("train", "val"):
        for annotation in json.loads(files[f"vqa_{subset}_annotations"].read_text())["annotations"]:
            for answer in annotation["answers"]:
                if answer["answer"] != annotation["multiple_choice_answer"]:
                    pairs[(annotation["multiple_choice_answer"], answer["answer"])] += 1
    disagreements = set(pairs)
    assert any(mc.isdigit() and other in {"one", "two", "three"} for mc, other in disagreements)  # "2" vs "two"
    assert any(other == mc.capitalize() for mc, other in disagreements)  # "red" vs "Red"


def test_vqa_answers_can_be_read_off_the_image(dataset):
    root, files, scenes = dataset
    checked = Counter()
    for subset in ("train", "val"):
        questions = {q["question_id"]: q for q in json.loads(files[f"vqa_{subset}_questions"].read_text())["questions"]}
        for annotation in json.loads(files[f"vqa_{subset}_annotations"].read_text())["annotations"]:
            question = questions[annotation["question_id"]]["question"]
            relative = f"coco/images/{subset}2014/COCO_{subset}2014_{annotation['image_id']:012d}.jpg"
            objects, answer = scenes[relative], annotation["multiple_choice_answer"]
            for obj in objects:  # the scene record matches the pixels
                assert _nearest_color(_pixel_at(root / relative, obj["position"])) == obj["color"]
            if match := re.fullmatch(r"What color is the (\w+)\?", question):
                (obj,) = [o for o in objects if o["shape"] == match[1]]
                assert _nearest_color(_pixel_at(root / relative, obj["position"])) == answer
            elif match := re.fullmatch(r"What shape is (?:on|at) the (\w+)\?", question):
                assert [o["shape"] for o in objects if o["position"] == match[1]] == [answer]
            elif question == "How many shapes are there?":
                assert answer == str(len(objects))
            else:
                color, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", question).groups()
                present = any(o["color"] == color and o["shape"] == shape for o in objects)
                assert answer == ("yes" if present else "no")
            checked[annotation["answer_type"]] += 1
    assert checked["yes/no"] and checked["number"] and checked["other"]


def test_gqa_files_follow_the_balanced_questions_schema(dataset):
    _, files, scenes = dataset
    answers = Counter()
    for split in ("train", "val", "testdev"):
        assert files[f"gqa_{split}"].name == f"{split}_balanced_questions.json"
        questions = json.loads(files[f"gqa_{split}"].read_text())
        assert questions
        for question_id, question in questions.items():
            assert isinstance(question_id, str)
            assert {"imageId", "question", "answer", "fullAnswer", "isBalanced", "types", "semantic"} <= set(question)
            assert (files["gqa_images"] / f"{question['imageId']}.jpg").is_file()
            objects = scenes[f"gqa/images/{question['imageId']}.jpg"]
            if match := re.fullmatch(r"What color is the (\w+)\?", question["question"]):
                assert [o["color"] for o in objects if o["shape"] == match[1]] == [question["answer"]]
            assert question["answer"].lower() in question["fullAnswer"].lower()
            answers[question["answer"]] += 1
    assert answers["yes"] and answers["no"]


def test_nlvr2_files_are_json_lines_with_two_images_named_from_the_identifier(dataset):
    root, files, scenes = dataset
    labels = Counter()
    for split in ("train", "dev", "test1"):
        lines = files[f"nlvr2_{split}"].read_text().splitlines()
        assert lines
        for line in lines:
            example = json.loads(line)
            assert {"identifier", "sentence", "left_url", "right_url", "label", "writer", "validation"} <= set(example)
            assert ("extra_validations" in example) == (split != "train")
            split_name, set_id, pair_id, sentence_id = example["identifier"].rsplit("-", 3)
            assert split_name == split and sentence_id in {"0", "1"}
            stem = f"{split}-{set_id}-{pair_id}"
            images = [f"nlvr2/images/{split}/{stem}-img{side}.png" for side in (0, 1)]
            assert all((root / image).is_file() for image in images)
            assert example["label"] in {"True", "False"}
            if match := re.fullmatch(r"The (left|right) image contains a (\w+) (\w+)\.", example["sentence"]):
                objects = scenes[images[0] if match[1] == "left" else images[1]]
                present = any(o["color"] == match[2] and o["shape"] == match[3] for o in objects)
                assert example["label"] == str(present)
            if example["sentence"] == "There are more shapes in the left image than in the right image.":
                assert example["label"] == str(len(scenes[images[0]]) > len(scenes[images[1]]))
            labels[example["label"]] += 1
    assert labels["True"] == labels["False"]  # one true and one false sentence per pair


def test_karpathy_captions_describe_every_shape(dataset):
    root, files, scenes = dataset
    data = json.loads(files["karpathy"].read_text())
    assert data["dataset"] == "coco"
    assert {image["split"] for image in data["images"]} == {"train", "val", "test", "restval"}
    sentence_ids = []
    for image in data["images"]:
        assert {"filename", "filepath", "cocoid", "split", "sentences", "imgid", "sentids"} <= set(image)
        assert (files["coco_images"] / image["filepath"] / image["filename"]).is_file()
        assert len(image["sentences"]) == 5
        objects = scenes[f"coco/images/{image['filepath']}/{image['filename']}"]
        for sentence in image["sentences"]:
            assert sentence["tokens"] == re.findall(r"[a-z0-9]+", sentence["raw"].lower())
            for obj in objects:
                assert f"{obj['color']} {obj['shape']}" in sentence["raw"].lower()
        sentence_ids += image["sentids"]
    assert len(set(sentence_ids)) == len(sentence_ids) == 5 * N_IMAGES
