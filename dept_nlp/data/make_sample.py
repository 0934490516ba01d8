"""Regenerate the synthetic sentiment sample shipped next to this script (sst2 schema: sentence, label, idx).

    python dept_nlp/data/make_sample.py --overwrite

Each sentence carries one or two adjectives of one polarity among neutral filler, and its label is that polarity
(1 positive, 0 negative): a rule a tiny T5 learns within a minute on a CPU. The output is the same on every run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 2024
SIZES = {"train": 600, "validation": 100, "test": 100}

POSITIVE = ["great", "wonderful", "excellent", "delightful", "brilliant", "charming", "moving", "superb", "lovely"]
NEGATIVE = ["terrible", "awful", "boring", "dull", "painful", "clumsy", "tedious", "dreadful", "bland"]
SUBJECTS = ["the movie", "the film", "the story", "the acting", "the script", "the ending", "the music", "the cast"]
TEMPLATES = [
    "{subject} was {first} .",
    "{subject} is {first} and {second} .",
    "i thought {subject} was {first} .",
    "overall , {subject} felt {first} .",
    "{subject} , though long , was {first} .",
    "from start to finish {subject} stayed {first} and {second} .",
]


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """Disjoint train/validation/test rows, each exactly half positive and half negative, in a seeded order."""
    rng = random.Random(seed)
    per_label = sum(SIZES.values()) // 2
    by_label: dict[int, list[str]] = {}
    for label, adjectives in ((0, NEGATIVE), (1, POSITIVE)):
        sentences: dict[str, None] = {}  # a dict keeps the generation order and drops repeats
        while len(sentences) < per_label:
            first, second = rng.sample(adjectives, 2)
            subject, template = rng.choice(SUBJECTS), rng.choice(TEMPLATES)
            sentences[template.format(subject=subject, first=first, second=second)] = None
        by_label[label] = list(sentences)
    splits, start = {}, 0
    for split, size in SIZES.items():
        rows = [(text, label) for label, texts in by_label.items() for text in texts[start : start + size // 2]]
        rng.shuffle(rows)
        splits[split] = [{"sentence": text, "label": label, "idx": idx} for idx, (text, label) in enumerate(rows)]
        start += size // 2
    return splits


def write_splits(output_dir: Path, overwrite: bool = False) -> list[Path]:
    paths = [output_dir / f"sst2_sample_{split}.jsonl" for split in SIZES]
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{[str(path) for path in existing]} exist; pass --overwrite to replace them.")
    for path, rows in zip(paths, build_splits().values()):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--overwrite", action="store_true", help="Replace existing sample files.")
    args = parser.parse_args()
    for path in write_splits(args.output_dir, overwrite=args.overwrite):
        print(path)


if __name__ == "__main__":
    main()
