"""`dept-eval`: evaluate saved DePT adapters (ours or official releases) on tasks, one at a time or mixed.

    dept-eval --model_name_or_path t5-base --adapter out/sst2 --adapter out/rte --task sst2 --task rte \\
        --split test --output_dir eval/ [--mixed]
    dept-eval --adapter official/sst2:sst2 --model_name_or_path t5-base --split validation
    dept-eval --compare eval/run_a eval/run_b

Adapters and tasks pair up in order, or `DIR:TASK` names the task of one adapter. This module is the generic
part. What is task-specific (flags for the data, loading the base model, the task's data, collator and metrics,
the check that a task fits an adapter) comes from the adapter's modality in `MODALITIES`: text
(`dept_nlp.evaluate.TextEvaluation`) or vision-language (`dept_vl.evaluate.VLEvaluation`). The modality of an
adapter is the `modality` of its `training_task.json`; an official DePT directory has none and counts as text
(`--modality` overrides both).

Nothing is evaluated until every pair has passed its checks: an adapter made for another base model
(`AdapterMismatchError`), a task whose labels differ from the adapter's training task (`TaskMismatchError`), or
result files that already exist stop the run first, with a message that names the pair.

Written to `--output_dir` (never overwritten): `dept_eval_<split>[_mixed].json` (metrics, examples, examples/s,
trainable parameters per pair), the same table as `.md`, and each pair's predictions as `..._predictions.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from tqdm.auto import tqdm

from dept.command_line import canonical_flag, check_model_name_or_path, run_console
from dept.config import ConfigError, read_training_task
from dept.errors import TaskMismatchError
from dept.model import AdapterMismatchError, DePTModel
from dept.multi_adapter import MultiAdapterModel
from dept.trainer import Evaluator, split_batch
from dept.training_args import check_output_dir_is_writable
from dept_nlp.evaluate import TextEvaluation
from dept_vl.evaluate import VLEvaluation

RESULT_PREFIX = "dept_eval"
SPLITS = ("validation", "test")


class Modality(Protocol):
    """What a modality provides to `dept-eval`. `training_task` is an adapter's `training_task.json` (None for an
    official DePT directory), `args` the parsed command line (the generic flags plus the modality's own)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the modality's data and generation flags (e.g. `--validation_file`, `--generation_max_length`)."""

    def check_task(self, task_name: str, training_task: dict | None, source: str) -> None:
        """Raise `TaskMismatchError` if `task_name` asks for other answers than the adapter was trained on."""

    def base_model_key(self, args: argparse.Namespace, task_name: str, training_task: dict | None) -> Hashable:
        """Tasks with equal keys share one base model (e.g. classifiers with the same number of labels)."""

    def load_tokenizer(self, args: argparse.Namespace, training_task: dict | None): ...

    def load_base_model(self, args: argparse.Namespace, task_name: str, training_task: dict | None) -> nn.Module: ...

    def build_eval_components(self, task_name: str, tokenizer, model: nn.Module, *, max_length: int, split: str,
                              args: argparse.Namespace, training_task: dict | None) -> tuple[Dataset, Any, Evaluator]:
        """(tokenized dataset cut at `max_length`, collate_fn, evaluator) for one split of one task."""


MODALITIES: dict[str, Modality] = {"text": TextEvaluation(), "vl": VLEvaluation()}


def check_modality(training_task: dict | None, modality: str, source: str) -> None:
    """Refuse to evaluate an adapter as another modality than the one it was trained on (`--modality`)."""
    trained = (training_task or {}).get("modality", "text")
    if training_task is not None and trained != modality:
        raise TaskMismatchError(f"{source} was trained on {trained} tasks {training_task['task_names']}, "
                                f"not {modality}.")


# --------------------------------------------------------------------------------------------------- the pairs


@dataclass
class EvaluationPair:
    """One adapter evaluated on one task."""

    adapter_dir: Path
    task_name: str
    name: str  # a short unique label for tables and MultiAdapterModel (no '.')
    training_task: dict | None
    modality: str
    trainable_parameters: int = 0
    max_length: int = 0
    result: dict = field(default_factory=dict)
    predictions: list = field(default_factory=list)  # in dataset order


def parse_pairs(adapters: Sequence[str], tasks: Sequence[str], modality: str | None) -> list[EvaluationPair]:
    """Pair adapters with tasks: `DIR:TASK` explicitly, otherwise in order (one task for all adapters works too)."""
    explicit, plain = [], []
    for spec in adapters:
        directory, sep, task = spec.rpartition(":")
        if sep and task and not Path(spec).exists():
            explicit.append((directory, task))
        else:
            plain.append(spec)
    if plain and len(tasks) not in (len(plain), 1):
        raise ConfigError(
            f"Got {len(plain)} adapter(s) without a task and {len(tasks)} --task value(s): give one --task per "
            "--adapter (they pair in order), a single --task for all of them, or write --adapter DIR:TASK."
        )
    if not plain and tasks:
        raise ConfigError("Every --adapter names its task (DIR:TASK), so --task is not used: drop it.")
    specs = explicit + [(d, tasks[0] if len(tasks) == 1 else tasks[i]) for i, d in enumerate(plain)]
    if not specs:
        raise ConfigError("Nothing to evaluate: pass --adapter DIR --task NAME (or --compare A B).")
    pairs, used = [], set()
    for directory, task in specs:
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"Adapter directory {path} does not exist.")
        training_task = read_training_task(path)
        name = _unique_name(f"{path.name or 'adapter'}-{task}".replace(".", "_"), used)
        pair_modality = modality or (training_task or {}).get("modality", "text")
        if pair_modality not in MODALITIES:
            raise ConfigError(f"{path}: unknown modality {pair_modality!r}; dept-eval knows {sorted(MODALITIES)}.")
        pairs.append(EvaluationPair(path, task, name, training_task, pair_modality))
    return pairs


def _unique_name(name: str, used: set[str]) -> str:
    candidate, i = name, 2
    while candidate in used:
        candidate, i = f"{name}-{i}", i + 1
    used.add(candidate)
    return candidate


# --------------------------------------------------------------------------------------------------- the run


class _BaseModels:
    """Base models and tokenizers, loaded once per (modality, `base_model_key`)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.models: dict[Hashable, nn.Module] = {}
        self.tokenizers: dict[str, Any] = {}

    def key(self, pair: EvaluationPair) -> tuple:
        return pair.modality, MODALITIES[pair.modality].base_model_key(self.args, pair.task_name, pair.training_task)

    def get(self, pair: EvaluationPair, device: torch.device) -> tuple[nn.Module, Any]:
        modality, key = MODALITIES[pair.modality], self.key(pair)
        if key not in self.models:
            model = modality.load_base_model(self.args, pair.task_name, pair.training_task)
            self.models[key] = model.to(device).eval()
        if pair.modality not in self.tokenizers:
            self.tokenizers[pair.modality] = modality.load_tokenizer(self.args, pair.training_task)
        return self.models[key], self.tokenizers[pair.modality]


def check_pairs(pairs: list[EvaluationPair], bases: _BaseModels, device: torch.device) -> None:
    """Every check that can fail, for every pair, before anything is evaluated."""
    for pair in pairs:
        where = f"adapter {pair.adapter_dir} on task {pair.task_name!r}"
        try:
            check_modality(pair.training_task, pair.modality, str(pair.adapter_dir))
            MODALITIES[pair.modality].check_task(pair.task_name, pair.training_task, str(pair.adapter_dir))
            base, _ = bases.get(pair, device)
            model = DePTModel.from_pretrained(base, pair.adapter_dir)
        except (AdapterMismatchError, TaskMismatchError, ConfigError) as err:
            raise type(err)(f"{where}: {err} Nothing was evaluated.") from None
        counts = model.num_trainable_parameters()
        pair.trainable_parameters = counts["dept"] + sum(counts[name] for name in model.modules_to_save)
        pair.max_length = model.config.max_length


@torch.no_grad()
def predict(model, dataloader: DataLoader, evaluator: Evaluator, device: torch.device, desc: str,
            adapter_names: Sequence[str] | None = None) -> tuple[list, list, list[tuple[int, int]]]:
    """(predictions, references, (pair index, row index) of each row) over a dataloader, with a progress bar.

    With `adapter_names`, `model` is a `MultiAdapterModel` and each row goes through the adapter of its pair.
    """
    predictions, references, pair_indices = [], [], []
    for batch in tqdm(dataloader, desc=desc):
        inputs, extras = split_batch(batch)
        references += extras.pop("references")
        rows = extras.pop("row_index", None)
        batch_inputs = send_to_device({**inputs, **extras}, device)
        if adapter_names is not None:
            routed = _RoutedModel(model, [adapter_names[pair] for pair, _ in rows])
            predictions += evaluator.predict_step(routed, batch_inputs)
            pair_indices += rows
        else:
            predictions += evaluator.predict_step(model, batch_inputs)
    return predictions, references, pair_indices


class _RoutedModel:
    """A `MultiAdapterModel` seen by an `Evaluator` as one plain Hugging Face model, each row on its adapter
    (its decoder-only `generate` returns the input ids followed by the new tokens, as transformers does)."""

    def __init__(self, model: MultiAdapterModel, adapter_names: list[str]):
        self.model, self.adapter_names = model, adapter_names

    def __call__(self, **inputs):
        return self.model(**inputs, adapter_names=self.adapter_names)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   adapter_names=self.adapter_names, **kwargs)


@dataclass
class _TaggedRows(Dataset):
    """The rows of one pair's dataset, each tagged with the pair's index, for shared (mixed) batches."""

    dataset: Dataset
    pair_index: int

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "row_index": (self.pair_index, i)}


@dataclass
class _MixedCollator:
    collate_fn: Any

    def __call__(self, rows: list[dict]) -> dict:
        row_indices = [row.pop("row_index") for row in rows]
        return {**self.collate_fn(rows), "row_index": row_indices}


def _record(pair: EvaluationPair, predictions: list, metrics: dict, num_examples: int, runtime: float) -> None:
    pair.predictions = predictions
    pair.result = {
        "adapter": str(pair.adapter_dir), "name": pair.name, "task": pair.task_name, "modality": pair.modality,
        "metrics": metrics, "num_examples": num_examples, "runtime_s": round(runtime, 4),
        "examples_per_second": round(num_examples / runtime, 3) if runtime > 0 else 0.0,
        "trainable_parameters": pair.trainable_parameters, "max_length": pair.max_length,
    }


def evaluate_one_at_a_time(pairs, bases, components, args, device) -> None:
    for pair in pairs:
        base, _ = bases.get(pair, device)
        # Built again right before its evaluation: it reloads the adapter's own head into the shared base.
        model = DePTModel.from_pretrained(base, pair.adapter_dir)
        dataset, collate_fn, evaluator = components[pair.name]
        loader = DataLoader(dataset, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn)
        start = time.perf_counter()
        predictions, references, _ = predict(model, loader, evaluator, device, desc=pair.name)
        runtime = time.perf_counter() - start
        _record(pair, predictions, evaluator.compute_metrics(predictions, references), len(dataset), runtime)


def evaluate_mixed(pairs, bases, components, args, device) -> None:
    """All pairs in shared batches on one `MultiAdapterModel`; each row uses its own adapter, each task its own
    metrics. Throughput is that of the whole mixed run."""
    keys = {bases.key(pair) for pair in pairs}
    collate_fns = [components[pair.name][1] for pair in pairs]
    if len(keys) > 1 or any(fn != collate_fns[0] for fn in collate_fns):
        raise ConfigError(
            "--mixed serves every adapter from one base model in shared batches, so the pairs must share the base "
            "model (and, for classifiers, the number of labels) and batch alike. Evaluate these pairs without "
            "--mixed, or in separate runs."
        )
    base, _ = bases.get(pairs[0], device)
    multi = MultiAdapterModel(base, {pair.name: pair.adapter_dir for pair in pairs})
    datasets = [_TaggedRows(components[pair.name][0], i) for i, pair in enumerate(pairs)]
    loader = DataLoader(ConcatDataset(datasets), batch_size=args.per_device_eval_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0), collate_fn=_MixedCollator(collate_fns[0]))
    start = time.perf_counter()
    predictions, references, pair_indices = predict(multi, loader, components[pairs[0].name][2], device,
                                                    desc="mixed", adapter_names=[pair.name for pair in pairs])
    runtime = time.perf_counter() - start
    total = len(predictions)
    for i, pair in enumerate(pairs):
        rows = sorted((row, j) for j, (index, row) in enumerate(pair_indices) if index == i)  # dataset order
        own_predictions = [predictions[j] for _, j in rows]
        evaluator = components[pair.name][2]
        metrics = evaluator.compute_metrics(own_predictions, [references[j] for _, j in rows])
        _record(pair, own_predictions, metrics, len(rows), runtime * len(rows) / total)
        pair.result["examples_per_second"] = round(total / runtime, 3) if runtime > 0 else 0.0


def run_evaluation(args: argparse.Namespace) -> dict:
    """Check every pair, evaluate them, write and return the results (see the module docstring)."""
    pairs = parse_pairs(args.adapter, args.task or [], args.modality)
    output_files = _result_paths(args)
    for path in output_files:
        if path.exists():
            raise FileExistsError(f"{path} already exists: dept-eval never overwrites results. Choose another "
                                  "--output_dir or move the old results away.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bases = _BaseModels(args)
    check_pairs(pairs, bases, device)
    components = {}
    for pair in pairs:
        base, tokenizer = bases.get(pair, device)
        components[pair.name] = MODALITIES[pair.modality].build_eval_components(
            pair.task_name, tokenizer, base, max_length=pair.max_length, split=args.split, args=args,
            training_task=pair.training_task)
    evaluate_pairs = evaluate_mixed if args.mixed else evaluate_one_at_a_time
    evaluate_pairs(pairs, bases, components, args, device)
    report = {"model_name_or_path": args.model_name_or_path, "split": args.split, "mixed": args.mixed,
              "results": [pair.result for pair in pairs]}
    table = results_table(report)
    print(table)
    if output_files:
        output_files[0].parent.mkdir(parents=True, exist_ok=True)
        output_files[0].write_text(json.dumps(report, indent=2) + "\n")
        output_files[1].write_text(table + "\n")
        lines = [json.dumps({"name": pair.name, "task": pair.task_name, "prediction": prediction}, default=str)
                 for pair in pairs for prediction in pair.predictions]
        output_files[2].write_text("".join(line + "\n" for line in lines))
    return report


def _result_paths(args: argparse.Namespace) -> list[Path]:
    if not args.output_dir:
        return []
    stem = Path(args.output_dir) / f"{RESULT_PREFIX}_{args.split}{'_mixed' if args.mixed else ''}"
    return [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_name(stem.name + "_predictions.jsonl")]


# --------------------------------------------------------------------------------------------------- tables


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(report: dict) -> str:
    """One markdown row per adapter x task: its metrics, examples, examples/s and trainable parameters."""
    rows = [
        [r["name"], r["task"], ", ".join(f"{k} {_number(v)}" for k, v in r["metrics"].items()) or "(no labels)",
         _number(r["num_examples"]), _number(r["examples_per_second"]), _number(r["trainable_parameters"])]
        for r in report["results"]
    ]
    mode = "mixed batches" if report["mixed"] else "one adapter at a time"
    title = f"**{report['split']}** split, {mode}, base `{report['model_name_or_path']}`\n\n"
    header = ["adapter", "task", "metrics", "examples", "examples/s", "trainable params"]
    return title + _markdown(header, rows)


def read_results(path: str | Path) -> dict:
    """A dept-eval result JSON, given as the file or the directory that holds exactly one."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"{RESULT_PREFIX}_*.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path} holds {len(found)} dept-eval result files "
                                    f"({[f.name for f in found]}): pass the file itself.")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"No dept-eval results at {path}.")
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or "results" not in report:
        raise ConfigError(f"{path} is not a dept-eval result file (no 'results').")
    return report


def comparison_table(report_a: dict, report_b: dict, label_a: str = "A", label_b: str = "B") -> str:
    """The two runs side by side, one row per task x metric, with B - A. The k-th result of a task in A is
    compared with the k-th result of that task in B."""
    def by_task(report):
        grouped: dict[str, list[dict]] = {}
        for result in report["results"]:
            grouped.setdefault(result["task"], []).append(result)
        return grouped

    grouped_a, grouped_b = by_task(report_a), by_task(report_b)
    rows = []
    for task in list(grouped_a) + [t for t in grouped_b if t not in grouped_a]:
        results_a, results_b = grouped_a.get(task, []), grouped_b.get(task, [])
        for k in range(max(len(results_a), len(results_b))):
            a = results_a[k] if k < len(results_a) else None
            b = results_b[k] if k < len(results_b) else None
            values_a = {**(a or {}).get("metrics", {}), "examples/s": (a or {}).get("examples_per_second")}
            values_b = {**(b or {}).get("metrics", {}), "examples/s": (b or {}).get("examples_per_second")}
            for metric in list(values_a) + [m for m in values_b if m not in values_a]:
                value_a, value_b = values_a.get(metric), values_b.get(metric)
                diff = value_b - value_a if value_a is not None and value_b is not None else None
                rows.append([task, a["name"] if a else "—", b["name"] if b else "—", metric,
                             "—" if value_a is None else _number(value_a), "—" if value_b is None else _number(value_b),
                             "—" if diff is None else f"{diff:+.2f}"])
    header = ["task", f"adapter ({label_a})", f"adapter ({label_b})", "metric", label_a, label_b, f"{label_b} − {label_a}"]
    return f"A = {label_a} ({report_a['split']}), B = {label_b} ({report_b['split']})\n\n" + _markdown(header, rows)


def run_comparison(args: argparse.Namespace) -> str:
    path_a, path_b = args.compare
    table = comparison_table(read_results(path_a), read_results(path_b), "A", "B")
    print(table)
    if args.output_dir:
        target = Path(args.output_dir) / f"{RESULT_PREFIX}_comparison.md"
        if target.exists():
            raise FileExistsError(f"{target} already exists: dept-eval never overwrites results.")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"A: {path_a}\nB: {path_b}\n\n{table}\n")
    return table


# --------------------------------------------------------------------------------------------------- the CLI


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dept-eval", description="Evaluate DePT adapters (ours or official DePT checkpoints) on tasks.",
        epilog="Each modality adds its own data flags (listed above by group). --debug shows the traceback of "
               "an error.", add_help=add_help,
    )
    parser.add_argument("--model_name_or_path", help="The base model the adapters were trained on.")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR[:TASK]",
                        help="An adapter directory; repeat for several. DIR:TASK names its task.")
    parser.add_argument("--task", action="append", default=[], help="The task of each --adapter, in order.")
    parser.add_argument("--split", choices=SPLITS, default="validation", help="The task's split to evaluate on.")
    parser.add_argument("--output_dir", help="Where to write the result JSON and markdown table (never overwritten).")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=32, help="Rows per batch.")
    parser.add_argument("--mixed", action="store_true",
                        help="Evaluate all pairs in shared batches on one MultiAdapterModel.")
    parser.add_argument("--modality", choices=sorted(MODALITIES),
                        help="Override the modality read from training_task.json (official checkpoints: text).")
    parser.add_argument("--compare", nargs=2, metavar=("RESULT_A", "RESULT_B"),
                        help="Show two dept-eval result files (or their directories) side by side.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Generic flags first; then the flags of the adapters' modalities (of every modality for `--help` without
    adapters). The spellings of `dept.command_line.FLAG_ALIASES` are accepted, as by the training CLIs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = build_parser(add_help=False).parse_known_args(argv)
    parser = build_parser()
    if known.compare:
        return parser.parse_args(argv)
    modalities = {known.modality} if known.modality else set()
    for spec in known.adapter:
        directory, sep, _ = spec.rpartition(":")
        path = Path(directory) if sep and not Path(spec).exists() else Path(spec)
        record = read_training_task(path) if path.is_dir() else None
        modalities.add((record or {}).get("modality", "text"))
    asks_for_help = any(word in ("-h", "--help") for word in argv)
    for modality in sorted(modalities or (MODALITIES if asks_for_help else ())):
        if modality not in MODALITIES:
            raise ConfigError(f"Unknown modality {modality!r}: dept-eval knows {sorted(MODALITIES)}.")
        MODALITIES[modality].add_arguments(parser)
    args = parser.parse_args([canonical_flag(word, parser) for word in argv])
    if not args.model_name_or_path:
        parser.error("--model_name_or_path is required to evaluate adapters.")
    check_model_name_or_path(args.model_name_or_path)
    if args.output_dir:
        check_output_dir_is_writable(args.output_dir)
    if args.per_device_eval_batch_size < 1:
        parser.error("--per_device_eval_batch_size must be >= 1.")
    return args


def evaluate(argv: Sequence[str] | None = None) -> dict | str:
    """Parse the flags, then evaluate (returns the report) or compare (returns the table); the table is printed
    once to stdout. For Python callers: errors are raised as they are."""
    args = parse_args(argv)
    return run_comparison(args) if args.compare else run_evaluation(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The `dept-eval` console script: exit status 0, or 2 with a one-line message (see `dept.command_line`)."""
    return run_console("dept-eval", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
