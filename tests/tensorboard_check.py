"""Reading TensorBoard event files back with TensorBoard's own EventAccumulator, and the
check every event test makes: each scalar is its stream's value at the same step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deconcnn_cli.contract import STREAMS, read_stream, stream_path
from deconcnn_cli.tbevents import scalars_of


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``log_dir`` as the viewer has it (purges applied)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What the streams of ``run_dir`` say, as float32 (how TensorBoard stores a scalar)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for stream in STREAMS:
        path = stream_path(run_dir, stream)
        for row in read_stream(path) if path.is_file() else []:
            for tag, value in scalars_of(stream, row).items():
                out.setdefault(tag, []).append((int(row["step"]), float(np.float32(value))))
    return out


def assert_events_match_streams(run_dir: Path, log_dir: Path) -> None:
    """Same tags, same steps in order (no duplicate), and every value exactly equal."""
    got, want = read_scalars(log_dir), expected_scalars(run_dir)
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in points], tag
        assert steps == sorted(set(steps)), tag  # no duplicate or out-of-order step
        for (step, value), (_, seen) in zip(points, got[tag], strict=True):
            same = (math.isnan(value) and math.isnan(seen)) or value == seen
            assert same, (tag, step, value, seen)
