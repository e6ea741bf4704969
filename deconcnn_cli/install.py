"""How to install an optional extra into the environment this ``decon`` runs from.

A hint that says ``pip install 'deconcnn_cli[parquet]'`` sends the user of an editable
checkout (``make demo``: ``.venv/bin/pip install -e .``) to a different pip and a copy from
an index. :func:`install_extra_command` names this interpreter's pip and, for a checkout, the
checkout. No torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_PACKAGE = "deconcnn_cli"


def install_extra_command(extra: str) -> str:
    """The command that installs ``extra`` where this ``decon`` runs from: ``.venv/bin/pip
    install -e '.[parquet]'`` in an editable checkout, ``pip install 'deconcnn_cli[parquet]'``
    otherwise (paths relative to the current folder when inside it)."""
    pip = Path(sys.executable).parent / "pip"
    pip_cmd = _short(pip) if pip.is_file() else f"{_short(Path(sys.executable))} -m pip"
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():  # an editable install: its source is here
        where = _short(checkout)
        return f"{pip_cmd} install -e '{where}[{extra}]'"
    return f"{pip_cmd} install '{_PACKAGE}[{extra}]'"


def _short(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it ("." for itself)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)
