"""What evaluate writes: metrics, the tuned post-processing, plots for DVC, the same for MLflow.

Files (under reports/):
    metrics.json            scalar scores per set ("val", "test", extra sets) and the baseline
    postprocess.json        the values chosen on val, and every grid point tried
    plots/per_image.csv     one row per image of every set
    plots/ap_by_iou.csv     AP at each IoU threshold, one column per set and the baseline
    plots/domains.csv       one row per domain (the test split, then each extra set)
    figures/ap_by_iou.png   the same curve as a picture (for MLflow and the README)
    figures/training_curves.png   the model's losses and val Dice per epoch (from its history.json)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from segflow.artifacts import write_csv, write_json
from segflow.core.preprocessing import POSTPROCESS_FIELDS, Preprocessing
from segflow.evaluate.figures import line_chart, training_chart
from segflow.evaluate.instance_metrics import IOU_THRESHOLDS
from segflow.evaluate.scoring import SplitScores

MAIN_SETS = ("val", "test")
DOMAIN_COLUMNS = ("images", "dice", "iou", "ap", "ap50", "ap75", "count_error")


@dataclass
class EvaluationReport:
    prep: Preprocessing  # the post-processing every set was scored with
    grid: list[dict]  # tuning rows (empty when tuning is off)
    tuned_by: str | None  # the metric maximised on val, or None
    scores: dict[str, SplitScores] = field(default_factory=dict)
    baseline: dict | None = None
    history: list[dict] = field(default_factory=list)  # the training run's epochs
    seconds_per_image: dict[str, float] = field(default_factory=dict)  # val model time, by TTA mode

    def add(self, name: str, scores: SplitScores) -> None:
        self.scores[name] = scores

    def extra_sets(self) -> list[str]:
        return [name for name in self.scores if name not in MAIN_SETS]

    def metrics(self) -> dict:
        """reports/metrics.json: scalars only, so `dvc metrics show` and registry tags can use it."""
        out = {name: self.scores[name].summary for name in MAIN_SETS}
        if self.extra_sets():
            out["extra_sets"] = {name: self.scores[name].summary for name in self.extra_sets()}
        if self.baseline:
            out["baseline"] = {k: v for k, v in self.baseline.items() if k != "ap_by_iou"}
        return out

    def postprocess(self) -> dict:
        """reports/postprocess.json: what export puts into preprocessing.json."""
        chosen = {k: getattr(self.prep, k) for k in POSTPROCESS_FIELDS} | {"instances": self.prep.instances}
        return chosen | {
            "tuned_on": "val" if self.tuned_by else None,
            "metric": self.tuned_by,
            "grid": self.grid,
        }

    def write(self, reports: Path) -> None:
        write_json(reports / "metrics.json", self.metrics())
        write_json(reports / "postprocess.json", self.postprocess())
        plots = reports / "plots"
        rows = [row for scores in self.scores.values() for row in scores.rows]
        write_csv(plots / "per_image.csv", rows)
        write_csv(plots / "domains.csv", self._domain_rows())
        curves = self._ap_curves()
        # Always written (dvc.yaml declares it): without instance truth it holds the thresholds only.
        table = [{"iou_threshold": t} | {k: round(v[i], 6) for k, v in curves.items()}
                 for i, t in enumerate(IOU_THRESHOLDS)]  # fmt: skip
        write_csv(plots / "ap_by_iou.csv", table)
        if curves:
            line_chart(reports / "figures" / "ap_by_iou.png", list(IOU_THRESHOLDS), curves,
                       "IoU threshold", "mask AP", "AP against IoU threshold")  # fmt: skip
        if self.history:
            training_chart(reports / "figures" / "training_curves.png", self.history)

    def _domain_rows(self) -> list[dict]:
        rows = []
        for name in ("test", *self.extra_sets()):
            summary = self.scores[name].summary
            row = {"set": name, "domain": "training domain" if name == "test" else "extra set"}
            rows.append(row | {k: round(summary[k], 6) for k in DOMAIN_COLUMNS if k in summary})
        return rows

    def _ap_curves(self) -> dict[str, list[float]]:
        curves = {name: s.ap_by_iou for name, s in self.scores.items() if s.ap_by_iou is not None}
        if curves and self.baseline and self.baseline.get("ap_by_iou") is not None:
            curves["baseline"] = self.baseline["ap_by_iou"]
        return curves

    def log_to_mlflow(self, parent_id: str, overlays: Path, reports: Path = Path("reports")) -> None:
        """Every score on the active (evaluate) run; test, extra-set and baseline ones on the model's row."""
        import mlflow

        from segflow.release.tracking import log_to_parent

        flat = {
            f"{name}_{k}": v for name, s in self.scores.items() for k, v in s.summary.items() if k != "images"
        }
        if self.baseline:
            flat |= {f"baseline_test_{k}": v for k, v in self.baseline["test"].items() if k != "images"}
        mlflow.log_metrics(
            flat | {f"val_ms_per_image_{m}": 1000 * s for m, s in self.seconds_per_image.items()}
        )
        # val_dice on the model's row is the per-epoch training curve; keep val scores off it.
        log_to_parent(parent_id, metrics={k: v for k, v in flat.items() if not k.startswith("val_")})
        client = mlflow.tracking.MlflowClient()
        for name in ("metrics.json", "postprocess.json"):
            client.log_artifact(parent_id, str(reports / name))
        client.log_artifacts(parent_id, str(reports / "plots"), "plots")
        if (reports / "figures").exists():
            client.log_artifacts(parent_id, str(reports / "figures"), "figures")
        if overlays.exists():
            client.log_artifacts(parent_id, str(overlays), "overlays")

    def describe(self) -> str:
        """The scores side by side, one line per set, for the terminal."""
        how = f"chosen on val by {self.tuned_by}" if self.tuned_by else "as set in params.yaml"
        header = ("set", "images", "Dice", "IoU", "AP50", "AP", "count err")
        lines = [
            f"evaluate: threshold {self.prep.threshold}, seed threshold {self.prep.seed_threshold}"
            f"{_prominence(self.prep)}, "
            f"min area {self.prep.min_area}, tta {self.prep.tta}{_sizes(self.prep)}"
            f"{', learned object score' if self.prep.object_score else ''} ({how})",
            "  {:<12} {:>6} {:>7} {:>7} {:>7} {:>7} {:>9}".format(*header),
        ]
        named = [(name, s.summary) for name, s in self.scores.items()]
        if self.baseline:
            named.append(("baseline", self.baseline["test"]))
        for name, summary in named:
            cells = [
                f"{summary[k]:7.4f}" if k in summary else f"{'-':>7}" for k in ("dice", "iou", "ap50", "ap")
            ]
            count = f"{summary['count_error']:9.1%}" if "count_error" in summary else f"{'-':>9}"
            lines.append(f"  {name:<12} {summary['images']:>6} {' '.join(cells)} {count}")
        if self.seconds_per_image:  # what each test-time augmentation costs, measured on val
            costs = ", ".join(f"{mode} {1000 * s:.0f} ms" for mode, s in self.seconds_per_image.items())
            lines.append(f"  model time per val image by tta: {costs}")
        return "\n".join(lines)


def _sizes(prep: Preprocessing) -> str:
    """The diameter multiples tried per image, when more than the estimate itself."""
    choices = prep.diameter_choices
    if choices == [1.0]:
        return ""
    if len(choices) == 1:
        return f", diameters x{choices[0]:g}"
    return ", diameters x" + "/".join(f"{m:g}" for m in choices) + " by solidity"


def _prominence(prep: Preprocessing) -> str:
    """The seed rule, when seeds are peaks rather than regions above the seed threshold."""
    return f", seed prominence {prep.seed_prominence:g}" if prep.seed_prominence else ""
