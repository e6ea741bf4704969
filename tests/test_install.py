"""The install hint names this environment's pip and, for an editable checkout, the checkout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deconcnn_cli.errors import DeconError
from deconcnn_cli.export.files import require_pyarrow
from tests.conftest import REPO


def test_parquet_hint_names_the_checkouts_pip(tmp_path: Path, monkeypatch) -> None:
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "pip").write_text("")
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed: import fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DeconError) as info:
        require_pyarrow()
    assert info.value.hint.startswith(f".venv/bin/pip install -e '{REPO}[parquet]'")
    monkeypatch.chdir(REPO)  # from the checkout itself: '.'
    with pytest.raises(DeconError) as info:
        require_pyarrow()
    assert "pip install -e '.[parquet]'" in info.value.hint
