"""Extract grid features for a directory of images into an h5 file in VL-T5's layout.

    python scripts/extract_features.py --image_dir data/coco/val2014 --output features/val2014_resnet50.h5 \\
        --backbone resnet50 --batch_size 64 --device cuda

Image ids are the file stems (`COCO_val2014_000000391895.jpg` -> `COCO_val2014_000000391895`). Rerunning the
same command resumes: images already in the output are skipped. The file records a fingerprint of the backbone's
weights, and a run with other weights (another --seed with --no-pretrained) is refused rather than mixed in.
Unreadable images are listed in `<output>.errors.txt`, and the exit status is 1 when there were any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dept_vl.features import FeatureStoreError, GridFeatureExtractor, extract_to_h5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", type=Path, required=True, help="images, searched recursively")
    parser.add_argument("--output", type=Path, required=True, help="the .h5 file to write or resume")
    parser.add_argument("--backbone", default="resnet50", help="a timm model, e.g. resnet50, vit_base_patch16_clip_224")
    parser.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load timm's pretrained weights (--no-pretrained: random weights, for offline tests)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights of --no-pretrained")
    parser.add_argument("--image_size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=4, help="processes that decode images")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    return parser.parse_args(argv)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output.suffix not in (".h5", ".hdf5"):
        raise SystemExit(f"--output must end in .h5 or .hdf5, got {args.output}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    extractor = GridFeatureExtractor(args.backbone, args.pretrained, args.image_size, args.device, seed=args.seed)
    height, width = extractor.grid_size
    print(f"{args.backbone}: {extractor.n_regions} regions ({height}x{width}) x {extractor.feat_dim} features each")
    try:
        report = extract_to_h5(args.image_dir, args.output, extractor, args.batch_size, args.num_workers)
    except FeatureStoreError as error:  # e.g. the output was made by another backbone
        raise SystemExit(f"error: {error}") from None
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
