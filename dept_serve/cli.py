"""`dept-serve`: an HTTP server for many DePT adapters over one frozen base model, in mixed dynamic batches.

    dept-serve --model_name_or_path t5-base --adapter sst2=outputs/sst2 --adapter rte=outputs/rte \\
        --adapter_root outputs --host 127.0.0.1 --port 8000 --max_batch_size 32 --max_wait_ms 5

The base model's kind (text: T5, decoder-only or encoder classifier; or VL-T5) comes from the first adapter's
`training_task.json`, or from `--modality` / `--task_type`.

`main` keeps the console contract of every dept CLI (`dept.command_line.console`): a bad flag, a missing model
or adapter directory, or an adapter that does not fit is one line on stderr with exit status 2, before the server
starts; the server's own log (uvicorn's, at `--log_level`) goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dept import DePTConfig
from dept.command_line import ArgumentParser, add_console_flags, check_model_name_or_path, run_console
from dept.config import TASK_TYPES
from dept.errors import FlagError
from dept.extras import LazyModule, require
from dept.hub import resolve_adapter_dir
from dept_serve.limits import Limits

# The server (FastAPI, the base model's code: VL-T5 subclasses transformers' T5) is imported on first use, once the
# flags are parsed: `--help` and a bad flag answer without it.
app = LazyModule("dept_serve.app")
engine = LazyModule("dept_serve.engine")
errors = LazyModule("dept_serve.errors")
service = LazyModule("dept_serve.service")


def _adapter_spec(value: str) -> tuple[str, str]:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"{value!r}: write --adapter NAME=DIR.")
    return name, directory


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dept-serve", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="The frozen base model the adapters share.")
    parser.add_argument("--adapter", action="append", default=[], type=_adapter_spec, metavar="NAME=DIR",
                        help="An adapter to load at start; repeat for several.")
    parser.add_argument("--adapter_root", help="POST /v1/adapters may load adapters from under this directory "
                                               "only (without it, loading through the API is off).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=Limits.max_batch_size, help="Most rows per batch.")
    parser.add_argument("--max_wait_ms", type=float, default=Limits.max_wait_ms,
                        help="Longest a batch's first row waits for more rows.")
    parser.add_argument("--max_inputs", type=int, default=Limits.max_inputs, help="Most inputs per request.")
    parser.add_argument("--max_new_tokens", type=int, default=Limits.max_new_tokens,
                        help="Largest max_new_tokens a request may ask for.")
    parser.add_argument("--max_num_beams", type=int, default=Limits.max_num_beams)
    parser.add_argument("--max_body_bytes", type=int, default=Limits.max_body_bytes,
                        help="Larger request bodies are refused (413).")
    parser.add_argument("--modality", choices=("text", "vl"), help="Default: the first adapter's.")
    parser.add_argument("--task_type", "--model_family", choices=TASK_TYPES,  # (--model_family: its earlier name)
                        help=f"{DePTConfig.field_help('task_type')} Text bases; unset: the first adapter's, else "
                             "detected from the model's config.")
    parser.add_argument("--num_labels", type=int, help="Classifier bases: default from the first adapter's task.")
    parser.add_argument("--tokenizer_name", help="Tokenizer, if not the base model's own.")
    parser.add_argument("--feat_dim", type=int, help="VL bases: feature size, default the first adapter's.")
    parser.add_argument("--feature_file", help="VL: stored features (.h5/.npy/npz dir; join files with +) that "
                                               "requests name by feature_id.")
    parser.add_argument("--backbone", help="VL: timm backbone for uploaded images, for adapters that record none.")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="VL: the --backbone's pretrained weights.")
    parser.add_argument("--image_size", type=int, help="VL: the --backbone's input size (default: its own).")
    parser.add_argument("--allow_other_base", action="store_true",
                        help="Serve adapters whose recorded base model (base_model_name_or_path) is not "
                             "--model_name_or_path, e.g. when this is a copy of it under another name (by default "
                             "they are refused: an adapter fits only the base it was trained on).")
    parser.add_argument("--device", help="Default: cuda if available, else cpu.")
    add_console_flags(parser, config_file=False)  # --debug, --log_level (also uvicorn's level)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("max_batch_size", "max_inputs", "max_new_tokens", "max_num_beams", "max_body_bytes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1.")
    if args.max_wait_ms < 0:
        parser.error("--max_wait_ms must be >= 0.")
    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        parser.error(f"--adapter names must be unique, got {names}.")
    check_model_name_or_path(args.model_name_or_path)
    return args


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(max_inputs=args.max_inputs, max_new_tokens=args.max_new_tokens, max_num_beams=args.max_num_beams,
                  max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size,
                  max_wait_ms=args.max_wait_ms)


def build_app(args: argparse.Namespace):
    """The app for parsed flags: the base model and the --adapter adapters are loaded here."""
    image_features = ({"backbone": args.backbone, "pretrained": args.pretrained, "image_size": args.image_size}
                      if args.backbone else None)
    adapters = {name: str(resolve_adapter_dir(path)) for name, path in args.adapter}  # a dir or a Hub id
    try:
        loaded = engine.ServingEngine.load(
            args.model_name_or_path, adapters, modality=args.modality, task_type=args.task_type,
            tokenizer_name=args.tokenizer_name, num_labels=args.num_labels, feat_dim=args.feat_dim,
            feature_file=args.feature_file, image_features=image_features, device=args.device,
            allow_other_base=args.allow_other_base)
    except errors.ServeError as err:  # what a request would get as an HTTP error is, at start, an --adapter to fix
        raise FlagError(f"--adapter: {err}") from err
    return app.create_app(service.DePTService(loaded, limits_from_args(args), args.adapter_root))


def serve(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, load the base model and the adapters, and serve until stopped (Ctrl-C or SIGTERM)."""
    args = parse_args(argv)
    app = build_app(args)
    uvicorn = require("uvicorn", extra="serve")  # here: --help and the start-up checks run without it
    uvicorn.run(app, host=args.host, port=args.port,
                log_level=logging.getLevelName(logging.getLogger("dept_serve").getEffectiveLevel()).lower())


def main(argv: Sequence[str] | None = None) -> int:
    return run_console("dept-serve", serve, argv)


if __name__ == "__main__":
    sys.exit(main())
