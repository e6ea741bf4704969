"""Shell completion of commands, variant and profile names, through the real entry point."""

from __future__ import annotations

from tests.conftest import complete_words


def test_completes_variants_profiles_and_commands():
    assert complete_words("decon train --variant ") == ["adamw", "base", "bn_off", "narrow"]
    assert complete_words("decon train --variant b") == ["base", "bn_off"]
    assert complete_words("decon train --profile sm") == ["smoke"]
    assert "train" in complete_words("decon tr")
