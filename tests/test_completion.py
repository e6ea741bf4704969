"""Shell completion of commands, variant and profile names, through the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DECON = str(Path(sys.executable).parent / "decon")  # the console script pip installed


def _complete(words: str) -> list[str]:
    env = {
        **os.environ,
        "_DECON_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    out = subprocess.run([DECON], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_completes_variants_profiles_and_commands():
    assert _complete("decon train --variant ") == ["adamw", "base", "bn_off", "narrow"]
    assert _complete("decon train --variant b") == ["base", "bn_off"]
    assert _complete("decon train --profile sm") == ["smoke"]
    assert "train" in _complete("decon tr")
