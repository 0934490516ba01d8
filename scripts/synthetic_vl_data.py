"""A small, deterministic vision-language dataset of coloured shapes, in the official file formats.

Each image shows one to three shapes (circle, square, triangle), each in a colour and at one of four places
(left, right, top, bottom) of a light background. Every question and caption is computed from the scene, so
a tiny model can learn them from the image. The annotation files follow the real datasets' schemas, so the
real loaders read them unchanged:

- VQAv2: `v2_OpenEnded_mscoco_<split>_questions.json` and `v2_mscoco_<split>_annotations.json` (train2014,
  val2014), with ten human answers per question that disagree as real annotators do ("two" vs "2", "Red").
- GQA: `<split>_balanced_questions.json` (train, val, testdev), `{question_id: {"imageId", "question", "answer",
  "fullAnswer", ...}}`.
- NLVR2: `<split>.json` JSON lines (train, dev, test1) with two images per example, named from the identifier
  as in the real data (`<split>-<set>-<pair>-img0.png` / `-img1.png`) and a label "True" / "False".
- COCO captions: Karpathy's `dataset_coco.json` with five captions per image and train / val / test / restval
  splits.

`scenes.json` records what each image shows (relative image path -> list of shapes), for tests and debugging.

    python -m scripts.synthetic_vl_data data/synthetic --n_images 200
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "POSITIONS",
    "SHAPE_RADIUS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "make_synthetic_vl_dataset",
    "render_scene",
]

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 200, 20)}
POSITIONS = ("left", "right", "top", "bottom")
BACKGROUND = (255, 255, 255)

_CENTERS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
SHAPE_RADIUS = 0.11  # of the image side; below 0.125, squares at neighbouring places cannot touch


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def find(self, shape: str | None = None, color: str | None = None) -> list[SceneObject]:
        return [o for o in self.objects if (shape in (None, o.shape)) and (color in (None, o.color))]

    def at(self, position: str) -> SceneObject | None:
        return next((o for o in self.objects if o.position == position), None)


def random_scene(rng: random.Random) -> Scene:
    positions = sorted(rng.sample(POSITIONS, rng.randint(1, 3)), key=POSITIONS.index)
    return Scene(tuple(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), p) for p in positions))


def shape_center(position: str, size: int) -> tuple[float, float]:
    """Pixel centre (x, y) of the place `position` in a `size` x `size` image."""
    x, y = _CENTERS[position]
    return x * size, y * size


def render_scene(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as a `size` x `size` RGB image."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    radius = SHAPE_RADIUS * size
    for obj in scene.objects:
        x, y = shape_center(obj.position, size)
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
        elif obj.shape == "square":
            draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=color)
        else:
            draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=color)
    return image


# ---- questions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Question:
    kind: str  # "count", "color", "shape", "exist"
    text: str
    answer: str
    full_answer: str
    subject: str  # what the question is about: a shape, "colour shape", or a position


def _questions(scene: Scene, rng: random.Random) -> list[_Question]:
    """Every question type that has a well-defined answer for this scene, one of each, in random order."""
    n = len(scene.objects)
    questions = [
        _Question("count", "How many shapes are there?", str(n), f"There are {_NUMBER_WORDS[n]} shapes.", "shape")
    ]
    unique_shapes = [s for s in SHAPES if len(scene.find(shape=s)) == 1]
    if unique_shapes:
        shape = rng.choice(unique_shapes)
        color = scene.find(shape=shape)[0].color
        questions.append(_Question("color", f"What color is the {shape}?", color, f"The {shape} is {color}.", shape))
    obj = rng.choice(scene.objects)
    where = _WHERE[obj.position]
    questions.append(
        _Question("shape", f"What shape is {where}?", obj.shape, f"The shape {where} is a {obj.shape}.", obj.position)
    )
    if rng.random() < 0.5:  # ask about a shape that is there, or one that is not, equally often
        target = rng.choice(scene.objects)
        shape, color = target.shape, target.color
    else:
        absent = [(s, c) for s in SHAPES for c in COLORS if not scene.find(s, c)]
        shape, color = rng.choice(absent)
    present = bool(scene.find(shape, color))
    full = f"Yes, there is a {color} {shape}." if present else f"No, there is no {color} {shape}."
    questions.append(
        _Question("exist", f"Is there a {color} {shape}?", "yes" if present else "no", full, f"{color} {shape}")
    )
    rng.shuffle(questions)
    return questions


_VQA_TYPES = {  # kind -> (question_type, answer_type), from the official lists
    "count": ("how many", "number"),
    "color": ("what color is the", "other"),
    "shape": ("what", "other"),
    "exist": ("is there a", "yes/no"),
}


def _other_forms(question: _Question) -> list[str]:
    """Ways annotators write the same answer; the official normalisation maps each back to `question.answer`."""
    answer = question.answer
    if question.kind == "count":
        return [_NUMBER_WORDS[int(answer)]]
    if question.kind == "shape":
        return [answer.capitalize(), f"a {answer}"]
    return [answer.capitalize(), f"{answer}."]


def _wrong_answer(question: _Question, rng: random.Random) -> str:
    if question.kind == "count":
        return str(int(question.answer) + rng.choice((-1, 1)))
    if question.kind == "exist":
        return "no" if question.answer == "yes" else "yes"
    options = SHAPES if question.kind == "shape" else tuple(COLORS)
    return rng.choice([option for option in options if option != question.answer])


def _human_answers(question: _Question, rng: random.Random) -> list[dict]:
    """Ten VQA answers: mostly the answer as is, some in another form, now and then a wrong one (unsure)."""
    answers = [(question.answer, "yes")] * 10
    slots = rng.sample(range(10), 4)
    for slot in slots[: rng.randint(0, 3)]:
        answers[slot] = (rng.choice(_other_forms(question)), rng.choice(("yes", "yes", "maybe")))
    if rng.random() < 0.3:
        answers[slots[3]] = (_wrong_answer(question, rng), rng.choice(("maybe", "no")))
    return [{"answer": a, "answer_confidence": c, "answer_id": i + 1} for i, (a, c) in enumerate(answers)]


# ---- captions ----------------------------------------------------------------------------------------------------


def _phrase(obj: SceneObject, with_place: bool = True) -> str:
    return f"a {obj.color} {obj.shape} {_WHERE[obj.position]}" if with_place else f"a {obj.color} {obj.shape}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _captions(scene: Scene, rng: random.Random) -> list[str]:
    objects = list(scene.objects)
    n = len(objects)
    shuffled = rng.sample(objects, n)
    count = "a single shape" if n == 1 else f"{_NUMBER_WORDS[n]} shapes"
    captions = [
        _join([_phrase(o) for o in objects]),
        "there is " + _join([_phrase(o, with_place=False) for o in shuffled]),
        f"{count} on a white background: " + _join([_phrase(o, with_place=False) for o in objects]),
        f"a picture of {_join([_phrase(o) for o in shuffled])}",
        f"{count}, " + _join([f"{o.color} {o.shape}" for o in shuffled]) + ", on a plain background",
    ]
    return [caption[0].upper() + caption[1:] + "." for caption in captions]


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())  # as Karpathy's tokens: lower case, no punctuation


# ---- writers -----------------------------------------------------------------------------------------------------


def _split_of(index: int, total: int, names: tuple[str, str, str]) -> str:
    """First 60% -> names[0], next 20% -> names[1], last 20% -> names[2]."""
    fraction = index / total
    return names[0] if fraction < 0.6 else names[1] if fraction < 0.8 else names[2]


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


class _Writer:
    def __init__(self, root: Path, image_size: int):
        self.root, self.image_size = root, image_size
        self.scenes: dict[str, list[dict]] = {}

    def image(self, relative: str, scene: Scene) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = render_scene(scene, self.image_size)
        if path.suffix == ".jpg":
            image.save(path, quality=95)
        else:
            image.save(path)
        self.scenes[relative] = [asdict(o) for o in scene.objects]
        return path


def _write_coco(writer: _Writer, n_images: int, rng: random.Random) -> dict[str, Path]:
    """COCO-style images, VQAv2 questions/annotations (train2014, val2014), Karpathy captions."""
    vqa: dict[str, tuple[list, list]] = {"train2014": ([], []), "val2014": ([], [])}
    karpathy_images, sentence_id = [], 0
    for index in range(n_images):
        subset = "train2014" if index < round(0.6 * n_images) else "val2014"
        coco_id = 100 + 7 * index  # sparse, like real COCO ids
        filename = f"COCO_{subset}_{coco_id:012d}.jpg"
        scene = random_scene(rng)
        writer.image(f"coco/images/{subset}/{filename}", scene)

        questions, annotations = vqa[subset]
        for k, question in enumerate(_questions(scene, rng)):
            question_id = coco_id * 1000 + k  # the VQA convention
            questions.append({"image_id": coco_id, "question": question.text, "question_id": question_id})
            question_type, answer_type = _VQA_TYPES[question.kind]
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": coco_id,
                    "question_type": question_type,
                    "answer_type": answer_type,
                    "multiple_choice_answer": question.answer,
                    "answers": _human_answers(question, rng),
                }
            )

        # Karpathy: train2014 images train; val2014 images are shared out to val, test and restval.
        split = "train" if subset == "train2014" else ("val", "val", "test", "test", "restval")[index % 5]
        image_index = len(karpathy_images)
        sentences = []
        for caption in _captions(scene, rng):
            sentences.append({"tokens": _tokens(caption), "raw": caption, "imgid": image_index, "sentid": sentence_id})
            sentence_id += 1
        karpathy_images.append(
            {
                "filepath": subset,
                "sentids": [s["sentid"] for s in sentences],
                "filename": filename,
                "imgid": image_index,
                "split": split,
                "sentences": sentences,
                "cocoid": coco_id,
            }
        )

    files = {"coco_images": writer.root / "coco" / "images"}
    for subset, (questions, annotations) in vqa.items():
        common = {"info": {"description": "synthetic shapes"}, "license": {}, "data_type": "mscoco"}
        files[f"vqa_{subset[:-4]}_questions"] = _write_json(
            writer.root / "vqa" / f"v2_OpenEnded_mscoco_{subset}_questions.json",
            {**common, "task_type": "Open-Ended", "data_subtype": subset, "questions": questions},
        )
        files[f"vqa_{subset[:-4]}_annotations"] = _write_json(
            writer.root / "vqa" / f"v2_mscoco_{subset}_annotations.json",
            {**common, "data_subtype": subset, "annotations": annotations},
        )
    files["karpathy"] = _write_json(
        writer.root / "coco" / "dataset_coco.json", {"images": karpathy_images, "dataset": "coco"}
    )
    return files


_GQA_TYPES = {  # kind -> (structural, semantic, detailed), as GQA's `types`
    "color": ("query", "attr", "colorObj"),
    "shape": ("query", "rel", "relS"),
    "exist": ("verify", "obj", "existAttr"),
}


def _gqa_semantic(question: _Question) -> list[dict]:
    if question.kind == "shape":
        return [
            {"operation": "select", "dependencies": [], "argument": "shape (-)"},
            {"operation": "filter position", "dependencies": [0], "argument": question.subject},
            {"operation": "query", "dependencies": [1], "argument": "name"},
        ]
    if question.kind == "color":
        return [
            {"operation": "select", "dependencies": [], "argument": f"{question.subject} (0)"},
            {"operation": "query", "dependencies": [0], "argument": "color"},
        ]
    color, shape = question.subject.split()
    return [
        {"operation": "select", "dependencies": [], "argument": f"{shape} (-)"},
        {"operation": "filter color", "dependencies": [0], "argument": color},
        {"operation": "exist", "dependencies": [1], "argument": "?"},
    ]


def _write_gqa(writer: _Writer, n_images: int, rng: random.Random) -> dict[str, Path]:
    splits: dict[str, dict] = {"train": {}, "val": {}, "testdev": {}}
    for index in range(n_images):
        image_id = str(2300000 + 3 * index)  # Visual Genome ids, as strings
        scene = random_scene(rng)
        writer.image(f"gqa/images/{image_id}.jpg", scene)
        questions = splits[_split_of(index, n_images, ("train", "val", "testdev"))]
        for k, question in enumerate(q for q in _questions(scene, rng) if q.kind != "count"):
            question_id = f"{index * 10 + k:08d}"
            semantic = _gqa_semantic(question)
            structural, semantic_type, detailed = _GQA_TYPES[question.kind]
            questions[question_id] = {
                "semantic": semantic,
                "entailed": [],
                "equivalent": [question_id],
                "question": question.text,
                "imageId": image_id,
                "isBalanced": True,
                "groups": {"global": question.kind if question.kind != "exist" else None, "local": detailed},
                "answer": question.answer,
                "semanticStr": "->".join(f"{op['operation']}: {op['argument']}" for op in semantic),
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                "types": {"detailed": detailed, "semantic": semantic_type, "structural": structural},
                "fullAnswer": question.full_answer,
            }
    files = {"gqa_images": writer.root / "gqa" / "images"}
    for split, questions in splits.items():
        files[f"gqa_{split}"] = _write_json(
            writer.root / "gqa" / "questions" / f"{split}_balanced_questions.json", questions
        )
    return files


def _nlvr2_statements(left: Scene, right: Scene, rng: random.Random) -> list[tuple[str, Callable[[], bool]]]:
    seen = rng.choice(left.objects + right.objects)  # half the time talk about a shape that is there
    shape, color = (seen.shape, seen.color) if rng.random() < 0.5 else (rng.choice(SHAPES), rng.choice(list(COLORS)))
    n = rng.randint(1, 3)
    return [
        (f"The left image contains a {color} {shape}.", lambda: bool(left.find(shape, color))),
        (f"The right image contains a {color} {shape}.", lambda: bool(right.find(shape, color))),
        (f"Both images contain a {shape}.", lambda: bool(left.find(shape)) and bool(right.find(shape))),
        (
            "There are more shapes in the left image than in the right image.",
            lambda: len(left.objects) > len(right.objects),
        ),
        (
            f"The right image contains exactly {_NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}.",
            lambda: len(right.objects) == n,
        ),
        (
            f"At least one image contains a {color} shape.",
            lambda: bool(left.find(color=color) or right.find(color=color)),
        ),
    ]


def _write_nlvr2(writer: _Writer, n_images: int, rng: random.Random) -> dict[str, Path]:
    n_pairs = max(n_images // 2, 3)
    splits: dict[str, list] = {"train": [], "dev": [], "test1": []}
    for index in range(n_pairs):
        split = _split_of(index, n_pairs, ("train", "dev", "test1"))
        set_id, pair_id = index // 4, index % 4  # four image pairs per set, as in NLVR2
        stem = f"{split}-{set_id}-{pair_id}"
        left, right = random_scene(rng), random_scene(rng)
        for side, scene in (("img0", left), ("img1", right)):
            writer.image(f"nlvr2/images/{split}/{stem}-{side}.png", scene)
        for sentence_id, want in enumerate(rng.sample((True, False), 2)):  # one true and one false sentence
            for _ in range(100):  # draw statements until one has the wanted truth value
                matching = [sentence for sentence, holds in _nlvr2_statements(left, right, rng) if holds() == want]
                if matching:
                    break
            sentence, label = rng.choice(matching), str(want)
            writer_id = str(rng.randint(0, 160))
            example = {
                "validation": {writer_id: label},
                "sentence": sentence,
                "left_url": f"https://example.invalid/nlvr2/{stem}-img0.png",
                "writer": writer_id,
                "label": label,
                "right_url": f"https://example.invalid/nlvr2/{stem}-img1.png",
                "synset": "geometric shape",
                "query": f"coloured shapes{set_id}",
                "identifier": f"{stem}-{sentence_id}",
            }
            if split != "train":
                example["extra_validations"] = {str(rng.randint(0, 160)): label for _ in range(4)}
            splits[split].append(example)
    files = {"nlvr2_images": writer.root / "nlvr2" / "images"}
    for split, examples in splits.items():
        path = writer.root / "nlvr2" / "data" / f"{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(example) + "\n" for example in examples))  # JSON lines, as released
        files[f"nlvr2_{split}"] = path
    return files


def make_synthetic_vl_dataset(
    root: str | Path, n_images: int = 100, seed: int = 0, image_size: int = 64
) -> dict[str, Path]:
    """Write the synthetic dataset under `root` (which must be empty or absent) and return its files.

    `n_images` images are made for COCO (VQAv2 + Karpathy captions), as many for GQA, and as many for NLVR2
    (`n_images // 2` pairs). The same `seed` gives byte-identical files.

    Returns name -> path: `coco_images`, `vqa_train_questions`, `vqa_train_annotations`, `vqa_val_questions`,
    `vqa_val_annotations`, `karpathy`, `gqa_images`, `gqa_train`, `gqa_val`, `gqa_testdev`, `nlvr2_images`,
    `nlvr2_train`, `nlvr2_dev`, `nlvr2_test1`, `scenes`.
    """
    root = Path(root)
    if n_images < 10:
        raise ValueError(f"n_images must be at least 10 so that every split gets images, got {n_images}")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; refusing to overwrite it. Choose a new or empty directory")
    writer = _Writer(root, image_size)
    files: dict[str, Path] = {}
    files.update(_write_coco(writer, n_images, random.Random(f"coco-{seed}")))
    files.update(_write_gqa(writer, n_images, random.Random(f"gqa-{seed}")))
    files.update(_write_nlvr2(writer, n_images, random.Random(f"nlvr2-{seed}")))
    files["scenes"] = _write_json(root / "scenes.json", writer.scenes)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes VL dataset.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--n_images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)
    for name, path in make_synthetic_vl_dataset(args.root, args.n_images, args.seed, args.image_size).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
