"""Which code is running: ``code_version()``. Torch-free, imported by ``training/`` and ``sweep/``.

``decon submit`` records it with each submission in ``sweep.json``; each training attempt
records it on its start line in ``attempts.jsonl``; ``decon verify`` compares the runs' own.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+g<git sha>`` of the code running now (``+gunknown`` outside git)."""
    try:
        version = metadata.version("deconcnn_cli")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=10", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        sha = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return f"{version}+g{sha}"
