"""Headless Debian chromium for the browser suite (``make test-browser``; marker ``browser``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


def chromium(url: str, user_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """One headless chromium on ``url`` with a fresh profile in ``user_dir``; ``extra``:
    more flags (``--dump-dom``, ``--screenshot=...``; a later ``--virtual-time-budget``
    replaces the default 5 s)."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={user_dir}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    return subprocess.run(
        [str(CHROMIUM), *flags, *extra, url], capture_output=True, text=True, timeout=180
    )
