"""The promotion gate: a pure decision from metrics and thresholds.

A candidate becomes champion only when it passes every absolute minimum AND is not worse
than the current champion, on the same test split, by more than the allowed regression.
With no champion yet, only the minimums apply. `decide` does no I/O; the step around it
(segflow.release.promote, run by stages.promote and `segflow promote`) gathers the
numbers and acts on the Decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from segflow.errors import UserError


@dataclass(frozen=True)
class Check:
    """One rule applied to one metric."""

    name: str  # e.g. "minimum dice" or "no regression in dice"
    metric: str
    value: float | None  # the candidate's score
    threshold: float  # the bar it had to reach
    passed: bool
    detail: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        """The details of failed checks (empty when promoting)."""
        return [c.detail for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    minimums: dict[str, float],
    max_regression: dict[str, float],
) -> Decision:
    """Decide whether the candidate may replace the champion.

    Args:
        candidate: the candidate's test metrics, e.g. {"dice": 0.97, "iou": 0.94}.
        champion: the champion's metrics on the same test split, or None without a champion.
        minimums: metric -> lowest acceptable candidate value.
        max_regression: metric -> how far below the champion the candidate may fall
            (absolute; 0 means "at least as good").

    Returns:
        The Decision with one Check per rule; promote only when every check passes.
    """
    checks = [_minimum(metric, candidate.get(metric), bar) for metric, bar in minimums.items()]
    if champion is not None:
        checks += [
            _regression(metric, candidate.get(metric), champion.get(metric), allowed)
            for metric, allowed in max_regression.items()
        ]
    return Decision(promote=all(c.passed for c in checks), checks=checks)


def _minimum(metric: str, value: float | None, bar: float) -> Check:
    if value is None:
        return Check(f"minimum {metric}", metric, None, bar, False, f"{metric}: candidate has no value")
    passed = value >= bar
    relation = ">=" if passed else "<"
    return Check(
        f"minimum {metric}", metric, value, bar, passed, f"{metric} {value:.4f} {relation} minimum {bar:.4f}"
    )


def _regression(metric: str, value: float | None, champion: float | None, allowed: float) -> Check:
    name = f"no regression in {metric}"
    if champion is None:
        # Nothing to compare against (the champion never measured this metric).
        return Check(
            name, metric, value, float("nan"), True, f"{metric}: champion has no value, not compared"
        )
    bar = champion - allowed
    if value is None:
        return Check(name, metric, None, bar, False, f"{metric}: candidate has no value")
    passed = value >= bar
    detail = (
        f"{metric} {value:.4f} vs champion {champion:.4f} "
        f"({'within' if passed else 'beyond'} allowed regression {allowed:.4f})"
    )
    return Check(name, metric, value, bar, passed, detail)


# --- Alias moves in the MLflow registry (the only side effects of a decision) -----------

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "segflow.champion_history"  # JSON list of versions that held `champion`, oldest first


def version_with_alias(client, name: str, alias: str):
    """The ModelVersion holding `alias`, or None when no version has it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_history(client, name: str) -> list[str]:
    import json

    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def move_champion(client, name: str, version: str) -> str | None:
    """Give `champion` to `version`, remembering the previous holder for rollback.

    Returns:
        The previous champion's version, or None when there was none.
    """
    import json

    previous = version_with_alias(client, name, CHAMPION)
    history = champion_history(client, name)
    if not history or history[-1] != str(version):
        history.append(str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return None if previous is None else str(previous.version)


def rollback_target(client, name: str) -> tuple[str, str]:
    """(the current champion's version, the version a rollback restores), moving nothing.

    Raises:
        UserError: there is no champion, or no earlier champion to return to.
    """
    current = version_with_alias(client, name, CHAMPION)
    if current is None:
        raise UserError(f"{name} has no champion in this registry; nothing to roll back")
    history = champion_history(client, name)
    if len(history) < 2:
        raise UserError(f"{name} has no earlier champion to roll back to (history: {history or 'empty'})")
    return str(current.version), history[-2]


def roll_back_champion(client, name: str) -> tuple[str, str]:
    """Move `champion` back to the version that held it before the current one.

    Returns:
        (the demoted version, the restored version).

    Raises:
        UserError: there is no earlier champion to return to.
    """
    import json

    demoted, restored = rollback_target(client, name)
    history = champion_history(client, name)[:-1]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, CHAMPION, restored)
    client.set_model_version_tag(name, demoted, "validation_status", "rolled_back")
    return demoted, restored
