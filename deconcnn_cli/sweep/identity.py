"""A run's identity recomputed from its config.json: the check ``decon verify`` makes.

config.json holds ``{"run_id", "config_hash", "config"}`` (:func:`deconcnn_cli.config.
config_record`). Both names are recomputed from the config itself, so that a config.json
swapped for another run's, its ``run_id`` and ``config_hash`` kept, does not pass.
"""

from __future__ import annotations

from typing import Any

from deconcnn_cli.config import RunConfig, config_hash, identity_json
from deconcnn_cli.config import run_id as id_of


def identity_mismatches(run_id: str, record: dict[str, Any]) -> list[str]:
    """Why config.json's ``config`` is not run ``run_id``'s (empty when it is): it is not a
    valid run config, it hashes to another ``config_hash``, or it gives another run id."""
    try:
        cfg = RunConfig.model_validate(record["config"])
    except ValueError as exc:  # pydantic's ValidationError: not a config this code can read
        first = str(exc).splitlines()[1:2] or [type(exc).__name__]
        return [f"its config is not a valid run config ({first[0].strip()})"]
    identity = identity_json(cfg)
    out = []
    computed = config_hash(cfg, identity)
    if record.get("config_hash") != computed:
        out.append(
            f"config_hash {record.get('config_hash')!r}, but its config hashes to {computed!r}"
        )
    expected_id = id_of(cfg, identity)
    if expected_id != run_id:
        out.append(f"its config is run {expected_id!r}, not {run_id!r}")
    return out
