"""verify's fast stream reading decides exactly as the cell-by-cell reference reading."""

from __future__ import annotations

from pathlib import Path

import pytest

from deconcnn_cli.sweep import verify

HEADER = "step,epoch,loss_train_nats,loss_train_bits,acc_train,lr,wd\n"


def _row(step: object, loss: str = "2.5") -> str:
    return f"{step},0.1,{loss},3.6,0.16,0.1,0.0001\n"


CLEAN = HEADER + "".join(_row(s) for s in range(6))
CASES = {
    "clean": CLEAN,
    "partial last line": CLEAN + "6,0.1,2.",
    "nan cell": CLEAN.replace("3,0.1,2.5", "3,0.1,nan"),
    "nan cell at a warned step": CLEAN.replace("4,0.1,2.5", "4,0.1,nan"),
    "inf cell": CLEAN.replace("3,0.1,2.5", "3,0.1,-inf"),
    "empty cell": CLEAN.replace("3,0.1,2.5", "3,0.1,"),
    "underscore number": CLEAN.replace("3,0.1,2.5", "3,0.1,2_5"),
    "not a number": CLEAN.replace("3,0.1,2.5", "3,0.1,abc"),
    "boolean column": HEADER + "".join(_row(s, "True") for s in range(6)),
    "ragged row": CLEAN.replace("3,0.1,2.5,", "3,0.1,2.5,9,"),
    "short row": CLEAN.replace("3,0.1,2.5,3.6,", "3,0.1,2.5,"),
    "blank line": CLEAN.replace(_row(3), _row(3) + "\n"),
    "duplicate step": CLEAN + _row(5),
    "gap": CLEAN.replace(_row(2), ""),
    "out of order": HEADER + "".join(_row(s) for s in (0, 2, 1, 3, 4, 5)),
    "off cadence": CLEAN + _row(9),
    "float step": CLEAN.replace("3,0.1,2.5", "3.0,0.1,2.5"),
    "header only": HEADER,
    "empty file": "",
    "carriage returns": CLEAN.replace("\n", "\r\n"),
}


def _reference(monkeypatch: pytest.MonkeyPatch, *args: object) -> list[verify.Problem]:
    with monkeypatch.context() as m:
        m.setattr(verify, "_regular_table", lambda path, limit: None)
        return verify._check_stream(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("diverged_at", [None, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_reading_matches_the_reference(
    case: str, diverged_at: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "step.csv"
    path.write_bytes(CASES[case].encode())
    args = ("r", "step", path, list(range(6)), diverged_at, {4})
    assert verify._check_stream(*args) == _reference(monkeypatch, *args)


def test_a_regular_stream_takes_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "step.csv"
    path.write_text(CASES["partial last line"])
    table = verify._regular_table(path, 2**20)
    assert table is not None and table["step"].tolist() == list(range(6))
    assert verify._check_stream("r", "step", path, list(range(6)), None, set()) == []
    for irregular in ("ragged row", "blank line", "float step", "boolean column"):
        path.write_text(CASES[irregular])
        assert verify._regular_table(path, 2**20) is None, irregular


def test_the_reference_finds_what_the_cases_break(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cases are not vacuous: the reference itself flags them."""
    kinds = {}
    for case, text in CASES.items():
        path = tmp_path / f"{len(kinds)}.csv"
        path.write_bytes(text.encode())
        found = _reference(monkeypatch, "r", "step", path, list(range(6)), None, {4})
        kinds[case] = {p.kind for p in found}
    assert kinds["clean"] == kinds["partial last line"] == set()
    assert kinds["nan cell at a warned step"] == kinds["empty cell"] == set()
    assert kinds["underscore number"] == set()  # Python's float reads 2_5
    assert kinds["nan cell"] == kinds["inf cell"] == kinds["not a number"] == {"nan"}
    assert kinds["duplicate step"] == {"stream_duplicate"}
    assert kinds["gap"] == {"stream_gap"} and kinds["off cadence"] == {"stream_extra"}
    assert kinds["out of order"] == {"stream_order"}
    assert kinds["float step"] == {"unreadable"}
    assert kinds["ragged row"] == {"nan"}  # a cell beyond the header (once a TypeError)
