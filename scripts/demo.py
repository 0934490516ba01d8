"""`make demo`: DePT end to end on an embedded default, offline, in a couple of minutes on a laptop CPU.

Text: a tiny T5 built here (random weights, a word tokenizer over the shipped sample data) is frozen, DePT is
attached, and the official CLI trains it on a small sentiment set in the real SST-2 schema: train -> eval ->
predict -> save the adapter -> reload it and evaluate. Vision-language: see scripts/demo_vl.py (run after).

With the internet, the same command on real data and weights is:

    accelerate launch scripts/train_nlp.py --model_name_or_path t5-base --task_name sst2 \\
        --peft_type PROMPT_TUNING_LORA --prefix_length 60 --r 30 --learning_rate 3e-1 --lora_embedding_lr 5e-3 \\
        --do_train --do_eval --do_predict --max_seq_length 256 --max_steps 30000 --output_dir outputs/sst2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny_model
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from dept import DePTModel
from dept.command_line import console_logging
from dept.trainer import Trainer
from dept.training_args import TrainingArguments
from dept_nlp.cli import train as train_nlp
from dept_nlp.data_files import load_task_datasets, sample_sst2_files
from dept_nlp.evaluate import TextEvaluator
from dept_nlp.preprocess import TextCollator, tokenize_rows
from dept_nlp.tasks import get_task

REPO_ROOT = Path(__file__).resolve().parent.parent


def text_demo(root: Path) -> dict[str, dict]:
    files = sample_sst2_files()
    texts = [json.loads(line)["sentence"] for path in files.values() for line in open(path)]
    base = save_tiny_model("seq2seq", root / "tiny-t5", texts, d_model=64, d_kv=16, d_ff=128)
    flags = ["--model_name_or_path", str(base), "--task_name", "sst2", "--peft_type", "PROMPT_TUNING_LORA",
             "--prefix_length", "16", "--r", "8", "--max_seq_length", "64", "--learning_rate", "0.3",
             "--lora_embedding_lr", "0.01", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size",
             "32", "--warmup_steps", "50", "--generation_max_length", "3", "--report_to", "none",
             "--logging_steps", "100"]
    for split, path in files.items():
        flags += [f"--{split}", path]

    print("\n== Untuned: a fresh DePT adapter on the frozen tiny T5 (validation) ==")
    untuned = train_nlp([*flags, "--do_eval", "--output_dir", str(root / "untuned")])

    print("\n== Train DePT (m=16, r=8), evaluate, predict, save ==")
    trained = train_nlp([*flags, "--do_train", "--do_eval", "--do_predict", "--max_steps", "600",
                         "--eval_steps", "200", "--save_steps", "200", "--output_dir", str(root / "sst2-dept")])

    print("\n== Reload the saved adapter onto a fresh copy of the base and evaluate ==")
    reloaded = evaluate_saved_adapter(base, root / "sst2-dept", root / "reloaded")
    return {"untuned": untuned, "trained": trained, "reloaded": reloaded}


def evaluate_saved_adapter(base_dir: Path, adapter_dir: Path, output_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = DePTModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), adapter_dir)
    model.print_trainable_parameters()
    task = get_task("sst2")
    validation = load_task_datasets("sst2", **sample_sst2_files(), splits=("validation",))["validation"]
    rows = tokenize_rows(validation, tokenizer, "seq2seq", model.config.max_length, split_name="validation")
    trainer = Trainer(model, TrainingArguments(output_dir=str(output_dir), report_to="none",
                                               load_best_model_at_end=False, per_device_eval_batch_size=32),
                      collate_fn=TextCollator(tokenizer, "seq2seq"),
                      evaluator=TextEvaluator(task, tokenizer, "seq2seq", max_new_tokens=3))
    return trainer.evaluate(rows, split="eval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="Where the demo writes (its own scratch dir).")
    parser.add_argument("--skip_vl", action="store_true", help="Run the text demo only.")
    args = parser.parse_args()
    root = Path(args.output_dir)
    if root.exists():
        if not (root / ".dept-demo").is_file():
            sys.exit(f"{root} exists and was not made by this demo; pass another --output_dir.")
        print(f"Replacing the previous demo output in {root}/")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / ".dept-demo").touch()

    with console_logging(own_loggers=("dept", "dept_nlp")):  # ours at INFO, other libraries at WARNING
        results = text_demo(root)
    print("\n== Text demo: sst2-format sample, tiny frozen T5 + DePT ==")
    print("| run | validation accuracy | test accuracy |\n|---|---|---|")
    print(f"| untuned adapter | {results['untuned']['eval_accuracy']:.1f} | |")
    print(f"| DePT, trained | {results['trained']['eval_accuracy']:.1f} | {results['trained']['test_accuracy']:.1f} |")
    print(f"| DePT, reloaded from disk | {results['reloaded']['eval_accuracy']:.1f} | |")
    print(f"Adapter: {root / 'sst2-dept'} (adapter_config.json + adapter_model.safetensors)")

    vl_demo = REPO_ROOT / "scripts" / "demo_vl.py"
    if not args.skip_vl and vl_demo.is_file():
        subprocess.run([sys.executable, str(vl_demo), "--work_dir", str(root / "vl")], check=True)


if __name__ == "__main__":
    main()
