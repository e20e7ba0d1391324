"""promote: the gate. Passes -> alias `champion` moves and the Bento is built; fails -> nothing moves.

A refusal is a normal outcome here (the pipeline still succeeds); `segflow promote --strict`
turns it into a failing exit code for CI.
"""

from __future__ import annotations

from segflow.artifacts import run_stage
from segflow.config import load_params
from segflow.release.promote import describe, promote


def main() -> None:
    report = promote(load_params())
    print(describe(report))


if __name__ == "__main__":
    run_stage(main)
