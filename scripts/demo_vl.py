"""The vision-language demo: DePT teaches a tiny VL-T5 to answer questions about images, offline, in about a minute.

1. Make a small image set of coloured shapes (`scripts.synthetic_vl_data`) with VQAv2, GQA and Karpathy COCO files in
   the real formats, and grid features from a random-weight resnet18 (`extract_to_h5`).
2. Build a tiny T5 and a word tokenizer from the synthetic texts, and fully train it on the COCO captions and
   the GQA questions (FULL, through the same CLI and trainer as every other run), as VL-T5 is pretrained on
   captioning and question answering: this is the "pretrained" VL-T5. It never sees a VQA question.
3. Score that model, untuned, on held-out VQA questions; then DePT-tune it on VQA (`configs/vl/demo.yaml`) and
   score it again on the same held-out questions.

    python scripts/demo_vl.py [--work_dir outputs/demo_vl] [--overwrite]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from synthetic_vl_data import make_synthetic_vl_dataset  # noqa: E402
from tiny_models import build_word_tokenizer, tiny_t5_config  # noqa: E402
from transformers import T5ForConditionalGeneration  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from dept_vl.cli import train as cli_main  # noqa: E402
from dept_vl.data import task_file_paths  # noqa: E402
from dept_vl.features import GridFeatureExtractor, extract_to_h5  # noqa: E402
from dept_vl.tasks import SPLITS, TaskSources, load_task_splits  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "vl" / "demo.yaml"
QUIET = ["--report_to", "none", "--logging_steps", "50"]


def prepare_data(work_dir: Path, n_images: int) -> tuple[Path, Path]:
    """Synthetic images + annotations, and their grid features; returns (data root, feature file)."""
    root = work_dir / "data"
    make_synthetic_vl_dataset(root, n_images=n_images, seed=0, image_size=64)
    torch.manual_seed(0)  # the random backbone weights
    extractor = GridFeatureExtractor("resnet18", pretrained=False, image_size=64)
    feature_file = work_dir / "features.h5"
    extract_to_h5(root, feature_file, extractor, progress=False)
    return root, feature_file


def build_base_model(root: Path, model_dir: Path) -> int:
    """A tiny T5 with a word tokenizer of every synthetic text, saved as a checkpoint; returns its vocabulary size."""
    sources = TaskSources(**task_file_paths(root))
    texts = ["vqa: gqa: caption:"]
    for rows in load_task_splits(["vqa", "gqa", "caption"], sources, SPLITS).values():
        texts += list(rows["source"]) + list(rows["target"])
        texts += [answer for reference in rows["references"] for answer in reference["answers"]]
    tokenizer = build_word_tokenizer(texts, model_dir)
    torch.manual_seed(0)
    T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), d_model=64)).save_pretrained(model_dir)
    return len(tokenizer)


def train_vl(argv: list[str]) -> dict[str, float]:
    """The `dept-train-vl` command line, quiet: the demo prints one line per stage (the log shows on failure)."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return cli_main(argv)
    except BaseException:
        print(log.getvalue()[-5000:])
        raise


def data_flags(root: Path, feature_file: Path) -> list[str]:
    paths = task_file_paths(root)
    return ["--vqa_dir", paths["vqa_dir"], "--gqa_dir", paths["gqa_dir"], "--caption_file", paths["caption_file"],
            "--feature_file", str(feature_file)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path("outputs/demo_vl"))
    parser.add_argument("--overwrite", action="store_true", help="Delete an existing --work_dir first.")
    parser.add_argument("--n_images", type=int, default=240)
    parser.add_argument("--pretrain_steps", type=int, default=400)
    options = parser.parse_args()

    work_dir = options.work_dir
    if work_dir.exists() and any(work_dir.iterdir()):
        if not options.overwrite:
            raise SystemExit(f"{work_dir} is not empty: pass --overwrite to replace it, or another --work_dir.")
        shutil.rmtree(work_dir)
    logging.basicConfig(level=logging.WARNING)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    start = time.perf_counter()

    root, feature_file = prepare_data(work_dir, options.n_images)
    vocab = build_base_model(root, work_dir / "t5-tiny")
    print(f"[1/4] {options.n_images} synthetic images with VQAv2, GQA and Karpathy COCO files under {root}; "
          f"resnet18 grid features in {feature_file}; tiny T5 (d=64, vocabulary {vocab}) ({time.perf_counter() - start:.0f}s)")

    pretrained = work_dir / "vlt5-pretrained"
    pretraining = train_vl([
        "--tasks", "caption,gqa", *data_flags(root, feature_file), "--model_name_or_path", str(work_dir / "t5-tiny"),
        "--peft_type", "FULL", "--learning_rate", "3e-3", "--max_steps", str(options.pretrain_steps),
        "--warmup_steps", "20", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
        "--max_seq_length", "16", "--max_target_length", "32", "--generation_max_length", "24",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--do_train", "--do_eval", "--seed", "0", "--output_dir", str(pretrained), *QUIET,
    ])
    print(f"[2/4] VL-T5 fully trained on captions and GQA: validation CIDEr-D {pretraining['eval_caption_cider']:.1f}, "
          f"GQA accuracy {pretraining['eval_gqa_accuracy']:.1f} ({time.perf_counter() - start:.0f}s)")

    common = ["--config", str(DEMO_CONFIG), *data_flags(root, feature_file), "--model_name_or_path", str(pretrained)]
    untuned = train_vl([*common, "--peft_type", "FULL", "--do_train", "false", "--do_eval", "false",
                        "--output_dir", str(work_dir / "untuned")])
    print(f"[3/4] untuned on held-out VQA: accuracy {untuned['test_vqa_accuracy']:.1f} "
          f"({time.perf_counter() - start:.0f}s)")

    adapter_dir = work_dir / "dept-vqa"
    tuned = train_vl([*common, "--output_dir", str(adapter_dir)])
    trainable = json.loads((adapter_dir / "training_task.json").read_text())["trainable_parameters"]
    print(f"[4/4] DePT-tuned on VQA ({time.perf_counter() - start:.0f}s)")
    print()
    print(f"  held-out VQA accuracy (official metric, {int(tuned['test_samples'])} questions):")
    print(f"    untuned VL-T5:  {untuned['test_vqa_accuracy']:5.1f}")
    print(f"    DePT:           {tuned['test_vqa_accuracy']:5.1f}")
    print(f"  trainable: prompt P {trainable['prompt']:,}, A and B {trainable['lora_embedding']:,}, "
          f"visual projection {trainable['visual_embedding']:,}")
    print(f"  adapter: {adapter_dir / 'adapter_model.safetensors'} (+ adapter_config.json); "
          f"predictions: {adapter_dir / 'predictions_test.jsonl'}")
    if tuned["test_vqa_accuracy"] <= untuned["test_vqa_accuracy"]:
        raise SystemExit("DePT did not beat the untuned model on held-out VQA: something is wrong.")


if __name__ == "__main__":
    main()
