"""great-expectations suites over manifests.

The manifest (one row per image, see segflow.data.folder) already records what was
found in each file; the suite states what must hold, and the report names every file that
breaks an expectation together with the reason in words.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from segflow.runtime import offline_env

# (description, expectation class name, kwargs) — one line per rule of the ingest contract.
INGEST_RULES: list[tuple[str, str, dict]] = [
    ("every image has a mask", "ExpectColumnValuesToNotBeNull", {"column": "mask"}),
    ("every mask has an image", "ExpectColumnValuesToNotBeNull", {"column": "image"}),
    ("every image is readable", "ExpectColumnValuesToBeInSet",
     {"column": "image_readable", "value_set": [True]}),
    ("every image has a supported pixel type", "ExpectColumnValuesToBeInSet",
     {"column": "dtype_ok", "value_set": [True]}),
    ("every mask is readable", "ExpectColumnValuesToBeInSet",
     {"column": "mask_readable", "value_set": [True]}),
    ("every mask has its image's size", "ExpectColumnPairValuesToBeEqual",
     {"column_A": "size", "column_B": "mask_size", "ignore_row_if": "either_value_is_missing"}),
    ("mask values are in the allowed set", "ExpectColumnValuesToBeInSet",
     {"column": "mask_values_ok", "value_set": [True]}),
    ("no duplicate images (by pixel content)", "ExpectColumnValuesToBeUnique", {"column": "content_hash"}),
]  # fmt: skip


COCO_IMAGE_RULES: list[tuple[str, str, dict]] = [
    (
        "every listed image file exists",
        "ExpectColumnValuesToBeInSet",
        {"column": "file_exists", "value_set": [True]},
    ),
    ("image ids are unique", "ExpectColumnValuesToBeInSet", {"column": "unique_id", "value_set": [True]}),
]
COCO_ANNOTATION_RULES: list[tuple[str, str, dict]] = [
    ("every annotation's image is listed", "ExpectColumnValuesToBeInSet",
     {"column": "image_known", "value_set": [True]}),
    ("every annotation's category is listed", "ExpectColumnValuesToBeInSet",
     {"column": "category_known", "value_set": [True]}),
    ("polygons have at least 3 points; RLE sizes match their image", "ExpectColumnValuesToBeInSet",
     {"column": "shape_ok", "value_set": [True]}),
]  # fmt: skip
# CVAT colour masks (segflow.data.cvat): one row per image/mask pair of the manifest.
CVAT_MASK_RULES: list[tuple[str, str, dict]] = [
    ("mask colours are all in the palette", "ExpectColumnValuesToBeInSet",
     {"column": "palette_ok", "value_set": [True]}),
]  # fmt: skip


@dataclass
class Check:
    rule: str
    success: bool
    failing: list[dict] = field(default_factory=list)  # {"file": ..., "reason": ...}
    observed: object = None


@dataclass
class ValidationReport:
    success: bool
    rows: int
    checks: list[Check]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def render(self) -> str:
        """A report a person reads: one line per rule, the failing files below it."""
        lines = [f"Validation {'passed' if self.success else 'FAILED'} on {self.rows} manifest rows"]
        for check in self.checks:
            lines.append(f"  [{'ok' if check.success else 'FAIL'}] {check.rule}")
            if check.observed is not None and not check.success:
                lines.append(f"         observed: {check.observed}")
            for item in check.failing[:20]:
                lines.append(f"         {item['file']}: {item['reason']}")
            if len(check.failing) > 20:
                lines.append(f"         ... and {len(check.failing) - 20} more (see the JSON report)")
        return "\n".join(lines)


def validate_ingest(manifest: pd.DataFrame, min_images: int) -> ValidationReport:
    """Run the ingest suite over a manifest.

    Args:
        manifest: rows from segflow.data.folder.inspect_pairs.
        min_images: the dataset must hold at least this many rows.

    Returns:
        The report; `success` is False when any rule fails.
    """
    from segflow.data.folder import MANIFEST_COLUMNS

    manifest = manifest.reindex(columns=list(dict.fromkeys([*MANIFEST_COLUMNS, *manifest.columns])))
    rules = [*INGEST_RULES, (f"dataset holds at least {min_images} images",
                             "ExpectTableRowCountToBeBetween", {"min_value": min_images})]  # fmt: skip
    return run_suite("ingest", manifest, rules)


def run_suite(name: str, frame: pd.DataFrame, rules: list[tuple[str, str, dict]]) -> ValidationReport:
    """Validate `frame` with great-expectations, one expectation per rule."""
    offline_env()
    import great_expectations as gx

    frame = frame.copy()
    frame["file"] = frame["image"].fillna(frame.get("mask"))
    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas(name).add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for description, kind, kwargs in rules:
        suite.add_expectation(getattr(gx.expectations, kind)(description=description, **kwargs))
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["file"]}
    with contextlib.redirect_stderr(io.StringIO()):  # GX draws progress bars on stderr
        result = batch.validate(suite, result_format=result_format)
    problems = dict(zip(frame["file"], frame.get("problem", [""] * len(frame)), strict=False))
    checks = [_check(r, problems) for r in result.results]
    return ValidationReport(success=bool(result.success), rows=len(frame), checks=checks)


def _check(result, problems: dict) -> Check:
    failing = []
    for item in result.result.get("unexpected_index_list") or []:
        file = item.get("file")
        failing.append({"file": file, "reason": problems.get(file) or "duplicate content"})
    observed = result.result.get("observed_value")
    return Check(
        rule=result.expectation_config.description,
        success=bool(result.success),
        failing=_dedupe(failing),
        observed=None if observed is None else observed,
    )


def _dedupe(items: list[dict]) -> list[dict]:
    seen, unique = set(), []
    for item in items:
        if item["file"] not in seen:
            seen.add(item["file"])
            unique.append(item)
    return unique
