"""JSON for people's programs: ``--json`` output and report.json stay valid JSON whatever a
damaged file held (JSON has no NaN or Infinity)."""

from __future__ import annotations

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no NaN or Infinity, and a reader
    of ``--json`` output must get valid JSON whatever a damaged file held."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
