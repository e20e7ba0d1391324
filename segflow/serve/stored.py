"""The BentoML model a checkout serves, looked up in the store (service.py, `segflow predict`)."""

from __future__ import annotations

import os

from segflow.errors import UserError


def stored_model(tag: str):
    """The BentoML model `tag`; UserError saying how to get it into the store when it is not there.

    BentoML's own message would only say it found no cloud context to fetch the model from."""
    import bentoml

    try:
        return bentoml.models.get(tag)
    except (bentoml.exceptions.NotFound, ValueError):  # ValueError: not even a valid tag
        raise UserError(
            f"no model {tag!r} in the BentoML store ({os.environ.get('BENTOML_HOME') or '~/bentoml'}): "
            "the promote stage imports the champion there, so run `dvc repro` in this checkout; where "
            "it has nothing to run (outputs pulled from a DVC remote), `dvc repro --force --single-item "
            "export` registers the model in this checkout's store and `segflow promote` then imports "
            "it. Or set SEGFLOW_MODEL_TAG to a model `bentoml models list` shows"
        ) from None
