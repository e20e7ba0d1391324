"""The `segflow` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from segflow.runtime import offline_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="write the synthetic sample dataset")
    sample.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    sample.add_argument("--count", type=int, default=None, help="number of images (default 120)")
    sample.add_argument("--size", type=int, default=None, help="image side in pixels (default 256)")
    sample.add_argument("--seed", type=int, default=None, help="generator seed (default 2024)")
    sample.set_defaults(run=_sample)

    predict = commands.add_parser("predict", help="segment image files with an exported model")
    predict.add_argument("images", nargs="+", type=Path, help="image files or folders")
    predict.add_argument(
        "--model",
        type=Path,
        default=Path("artifacts/export"),
        help="folder with model.onnx and preprocessing.json (default: artifacts/export)",
    )
    predict.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    predict.set_defaults(run=_predict)

    promote = commands.add_parser("promote", help="run the promotion gate on the exported candidate")
    promote.add_argument("--strict", action="store_true", help="exit 1 when the gate refuses (for CI)")
    promote.set_defaults(run=_promote)

    rollback = commands.add_parser("rollback", help="give 'champion' back to the previous champion")
    rollback.set_defaults(run=_rollback)

    args = parser.parse_args(argv)
    offline_env()
    try:
        return args.run(args) or 0
    except (FileNotFoundError, ValueError) as exc:  # includes ParamsError, StageError
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _sample(args) -> int:
    from dataclasses import replace

    from segflow.datasets.sample import SampleSpec, generate_sample

    overrides = {k: getattr(args, k) for k in ("count", "size", "seed") if getattr(args, k) is not None}
    spec = replace(SampleSpec(), **overrides)
    if spec.count < 1 or spec.size < 32:
        raise ValueError("--count must be at least 1 and --size at least 32")
    written = generate_sample(args.out, spec)
    print(f"wrote {len(written)} images of {spec.size}x{spec.size} with instance masks to {args.out}")
    return 0


def _promote(args) -> int:
    from segflow.config import load_params
    from segflow.release import describe, promote

    report = promote(load_params())
    print(describe(report))
    return 1 if args.strict and not report["decision"]["promote"] else 0


def _rollback(args) -> int:
    from segflow.config import load_params
    from segflow.release import rollback

    result = rollback(load_params())
    print(f"champion: version {result['demoted']} -> version {result['champion']}")
    print(f"bento: {result['bento']['bento_tag']}")
    return 0


def _predict(args) -> int:
    from segflow.evaluation import overlay
    from segflow.images import IMAGE_SUFFIXES, read_image, write_png
    from segflow.inference import Segmenter

    model = args.model / "model.onnx"
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no exported model; run `dvc repro` first or pass --model")
    segmenter = Segmenter.from_onnx(model, args.model / "preprocessing.json")
    files = []
    for path in args.images:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in files:
        image = read_image(path)
        prediction = segmenter.predict_one(image)
        write_png(args.out / f"{path.stem}_mask.png", prediction.mask)
        write_png(args.out / f"{path.stem}_overlay.png", overlay(image, prediction.mask * 0, prediction.mask))
        summary = {"image": str(path), "height": image.shape[0], "width": image.shape[1],
                   "foreground_fraction": float(prediction.mask.mean())}  # fmt: skip
        (args.out / f"{path.stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{path}: foreground {summary['foreground_fraction']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
