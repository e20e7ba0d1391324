"""The `segflow` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from segflow.errors import UserError
from segflow.runtime import configure_logging, offline_env

OUTLINE_FORMATS = ("roi", "geojson")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="write the synthetic sample dataset")
    sample.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    sample.add_argument("--count", type=int, default=None, help="number of images (default 120)")
    sample.add_argument("--size", type=int, default=None, help="image side in pixels (default 256)")
    sample.add_argument("--seed", type=int, default=None, help="generator seed (default 2024)")
    sample.add_argument(
        "--domain",
        default=None,
        help="how the cells are imaged: 'default' (the embedded dataset) or 'shifted' (another "
        "microscope: uneven light, low contrast, weak halos, more blur and noise; for "
        "domain-shift evaluation, e.g. --out data/shifted --domain shifted --count 24)",
    )
    sample.set_defaults(run=_sample)

    predict = commands.add_parser(
        "predict",
        help="segment images exactly as the service does: per image the JSON answer, class mask, "
        "instance labels, measurements and overlay; objects.csv measures every object of every image",
    )
    predict.add_argument(
        "images", nargs="+", type=Path, help="image files (PNG, JPEG, TIFF, .npy) or folders"
    )
    predict.add_argument(
        "--model",
        default=None,
        help="a BentoML model tag, or a folder with model.onnx and preprocessing.json "
        "(default: the model the service serves: $SEGFLOW_MODEL_TAG, else this checkout's last "
        "promoted champion from logs/release.json, else segflow-segmenter:latest)",
    )
    predict.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    predict.add_argument(
        "--diameter",
        type=_positive_pixels,
        default=None,
        help="the objects' diameter in pixels, for models trained at one object size "
        "(train.diameter); default: the model's own setting, usually a per-image estimate",
    )
    predict.add_argument(
        "--formats",
        nargs="+",
        choices=OUTLINE_FORMATS,
        default=[],
        help="also write outlines for desktop tools: roi (<stem>_rois.zip, an ImageJ ROI set for "
        "Fiji's ROI Manager), geojson (<stem>.geojson, QuPath detections with measurements)",
    )
    predict.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8"),
        default=None,
        help="the model variant to run: fp32, the INT8 one export checked (int8), or the faster of "
        "the two on this CPU (auto); default: serve.precision in params.yaml",
    )
    predict.set_defaults(run=_predict)

    promote = commands.add_parser("promote", help="run the promotion gate on the exported candidate")
    promote.add_argument("--strict", action="store_true", help="exit 1 when the gate refuses (for CI)")
    promote.set_defaults(run=_promote)

    rollback = commands.add_parser("rollback", help="give 'champion' back to the previous champion")
    rollback.set_defaults(run=_rollback)

    team = commands.add_parser(
        "tracking-server",
        help="run a team MLflow tracking server: PostgreSQL for runs and the registry, proxied "
        "artifacts on disk (point checkouts at it with MLFLOW_TRACKING_URI=http://HOST:PORT)",
    )
    team.add_argument(
        "--dir", type=Path, default=Path(".mlflow-server"), help="its data (default: .mlflow-server)"
    )
    team.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    team.add_argument("--port", type=int, default=5000, help="the server's port (default 5000)")
    team.add_argument(
        "--db-port", type=int, default=5433, help="PostgreSQL's port on 127.0.0.1 (default 5433)"
    )
    team.set_defaults(run=_tracking_server)

    args = parser.parse_args(argv)
    offline_env()
    configure_logging()
    try:
        return args.run(args) or 0
    except (UserError, FileNotFoundError) as exc:  # bugs keep their traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _sample(args) -> int:
    from dataclasses import replace

    from segflow.data.sample import SampleSpec, generate_sample

    overrides = {
        k: getattr(args, k) for k in ("count", "size", "seed", "domain") if getattr(args, k) is not None
    }
    spec = replace(SampleSpec(), **overrides)
    if spec.count < 1 or spec.size < 32:
        raise UserError("--count must be at least 1 and --size at least 32")
    written = generate_sample(args.out, spec)
    print(
        f"wrote {len(written)} {spec.domain}-domain images of {spec.size}x{spec.size} "
        f"with instance masks to {args.out}"
    )
    return 0


def _promote(args) -> int:
    from segflow.config import load_params
    from segflow.release.promote import describe, promote

    report = promote(load_params())
    print(describe(report))
    return 1 if args.strict and not report["decision"]["promote"] else 0


def _rollback(args) -> int:
    from segflow.config import load_params
    from segflow.release.promote import rollback

    result = rollback(load_params())
    print(f"champion: version {result['demoted']} -> version {result['champion']}")
    print(f"bento: {result['bento']['bento_tag']}")
    return 0


def _tracking_server(args) -> int:
    from segflow.release.teamserver import serve

    return serve(args.dir, args.host, args.port, args.db_port)


def _positive_pixels(text: str) -> float:
    """argparse type: a positive number of pixels."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of pixels, e.g. 30")
    return value


def _predict(args) -> int:
    import os

    from segflow.config import load_params
    from segflow.core.measurements import channel_count, measurement_columns
    from segflow.paths import repo_root
    from segflow.serve.answers import csv_text
    from segflow.serve.settings import champion_model_tag
    from segflow.serve.uploads import UploadError, UploadLimits, decode_upload

    ref = args.model or os.environ.get("SEGFLOW_MODEL_TAG") or champion_model_tag(repo_root())
    serve = load_params().serve
    segmenter, model = _open_model(ref, args.precision or serve.precision)
    # The service's decoding and size rules; only the upload byte cap does not apply to local files.
    limits = UploadLimits(2**62, serve.max_pixels, tuple(serve.formats), tuple(serve.dtypes))
    segmenter.max_pixels = serve.max_pixels  # as the service: also after rescaling to the trained object size
    files = _image_files(args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    failed, table, channels = 0, [], set()
    for path in files:
        try:
            image = decode_upload(path.read_bytes(), limits)
        except UploadError as exc:
            print(f"{path}: skipped: {exc.reason}", file=sys.stderr)
            failed += 1
            continue
        prediction = segmenter.predict_one(image, args.diameter)
        classes = list(segmenter.prep.classes)
        rows = _write_outputs(args.out, path.stem, image, prediction, classes, model, args.formats)
        channels.add(channel_count(image))
        table += [{"image": path.name} | row for row in rows]
        print(f"{path}: {len(rows)} objects")
    # One table for the whole run; grey and colour images side by side get every intensity column.
    columns = dict.fromkeys(c for n in sorted(channels or {1}) for c in measurement_columns(n))
    (args.out / "objects.csv").write_text(csv_text(table, ["image", *columns]))
    print(f"wrote {len(files) - failed} results to {args.out}" + (f"; {failed} skipped" if failed else ""))
    return 1 if failed else 0


def _write_outputs(
    out: Path, stem: str, image, prediction, classes: list[str], model: dict, formats: list[str]
) -> list[dict]:
    """Write one image's files to `out` (the service's answers, byte for byte, plus the
    outline `formats` asked for); return its objects' measurements."""
    from segflow.core.measurements import channel_count, measure_objects
    from segflow.serve.answers import (
        LABEL_SUFFIXES,
        answer,
        label_format,
        labels_image,
        mask_png,
        measurements_csv,
        overlay_png,
    )
    from segflow.serve.outlines import geojson_collection, imagej_rois

    result = answer(image, prediction, classes, model)
    rows = measure_objects(prediction.instances, prediction.mask, image, classes)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}_mask.png").write_bytes(mask_png(prediction))
    fmt = label_format(prediction)  # PNG, or a 32-bit TIFF beyond 65,535 objects
    (out / f"{stem}_labels{LABEL_SUFFIXES[fmt]}").write_bytes(labels_image(prediction, fmt))
    (out / f"{stem}_objects.csv").write_text(measurements_csv(rows, channel_count(image)))
    (out / f"{stem}_overlay.png").write_bytes(overlay_png(image, prediction))
    if "roi" in formats:
        (out / f"{stem}_rois.zip").write_bytes(imagej_rois(prediction.instances, result["objects"]))
    if "geojson" in formats:
        collection = geojson_collection(prediction.instances, result["objects"], {r["id"]: r for r in rows})
        (out / f"{stem}.geojson").write_text(json.dumps(collection) + "\n")
    return rows


def _open_model(ref: str, precision: str):
    """(Segmenter, model info) for a model folder or a BentoML model tag, in `precision`
    (auto, fp32 or int8) chosen as the service chooses (segflow.serve.precision)."""
    from segflow.core.inference import Segmenter
    from segflow.core.preprocessing import Preprocessing
    from segflow.serve.answers import model_info
    from segflow.serve.precision import choose, warmup_images

    folder = Path(ref)
    if folder.is_dir():
        if not (folder / "model.onnx").is_file():
            raise FileNotFoundError(f"{folder}: no model.onnx; pass an export folder (artifacts/export)")
        info = model_info({}, None)  # an export folder is not a registry version
    else:
        from segflow.release.bento import load_bentoml
        from segflow.serve.stored import stored_model

        load_bentoml()  # offline
        try:
            stored = stored_model(ref)
        except UserError as exc:
            raise FileNotFoundError(f"{exc}; or pass --model artifacts/export") from None
        folder = Path(stored.path)
        info = model_info(dict(stored.info.labels), str(stored.tag))
    prep = Preprocessing.load(folder / "preprocessing.json")
    segmenter, choice = choose(
        folder, precision, lambda path: Segmenter.from_onnx(path, prep), warmup_images(prep, 1)
    )
    logging.getLogger(__name__).info(
        "model %s: %s (%s)", info.get("tag") or folder, choice.precision, choice.reason
    )
    return segmenter, info


def _image_files(paths: list[Path]) -> list[Path]:
    from segflow.core.images import IMAGE_SUFFIXES

    suffixes = (*IMAGE_SUFFIXES, ".npy")
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) in {' '.join(map(str, paths))}")
    return files


if __name__ == "__main__":
    sys.exit(main())
