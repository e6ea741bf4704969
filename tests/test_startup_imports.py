"""The commands a researcher types most (monitor, verify, recover, completion) start without
loading the heavy libraries: torch, scipy, pandas and matplotlib cost ~0.3-1 s of imports
each, and `decon monitor` must answer in about a second (docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.sweep.synthetic import write_sweep

HEAVY = ("torch", "scipy", "pandas", "matplotlib", "tensorboard")

# runs the real entry point in-process, then names the heavy modules it left loaded
PROBE = """
import sys
from deconcnn_cli.cli import main
sys.argv = ["decon", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("LOADED", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["monitor", "--json"],
        ["monitor"],
        ["monitor", "--show-failed"],
        ["verify"],
        ["recover", "--dry-run"],
        ["--help"],
    ],
)
def test_everyday_commands_load_no_heavy_library(tmp_path: Path, argv: list[str]):
    """On a local sweep of 40 runs in every state (rows, folds, failures, an ETA)."""
    code = PROBE.format(heavy=HEAVY)
    root = tmp_path / "sweep"
    write_sweep(root, 40)
    extra = [] if argv == ["--help"] else ["--root", str(root)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv, *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED")]
    assert line, proc.stdout + proc.stderr
    assert line[-1] == "LOADED []", f"{' '.join(argv)}: {line[-1]}"
    if argv[0] == "monitor":  # the command really ran on the sweep
        assert "running" in proc.stdout, proc.stdout + proc.stderr
