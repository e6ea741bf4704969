"""CI-only: TensorBoard on 127.0.0.1 against a demo-shaped sweep's event files, in headless
Debian chromium: the page lists every run and draws their curves (``make test-browser``).

The sweep is the demo's shape (4 variants x 2 seeds) with synthetic streams; each run's
``tb/`` is written by the runs' own event writer from them. The screenshot's path is
printed (a CI artefact). Skipped with a note where /usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deconcnn_cli.contract import TENSORBOARD_DIR
from deconcnn_cli.tbevents import write_streams
from tests.browser import CHROMIUM, chromium
from tests.export.synthetic import write_manifest, write_run

VARIANTS = ("base", "bn_off", "narrow", "adamw")
START_S = 120  # TensorBoard's first load of the logdir, on a busy 2-core machine


def _demo_like_sweep(root: Path) -> list[str]:
    runs = {
        f"{v}_lr0.1_wd0.001_s{s}_{i}{s}": {"variant": v, "lr": 0.1, "weight_decay": 1e-3,
                                          "seed": s}
        for i, v in enumerate(VARIANTS) for s in range(2)
    }  # fmt: skip
    write_manifest(root, runs, grid="demo")
    for k, run_id in enumerate(runs):
        write_run(root, run_id, steps=120, steps_per_epoch=10, alpha=0.2 + 0.05 * k, seed=k)
        run_dir = root / "runs" / run_id
        write_streams(run_dir, run_dir / TENSORBOARD_DIR)
    return list(runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (127.0.0.1 only)
        return json.loads(r.read())


@pytest.mark.browser
def test_tensorboard_lists_the_runs_and_draws_their_curves(tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: the browser suite runs in CI (make test-browser)")
    root = tmp_path / "sweep"
    run_ids = _demo_like_sweep(root)
    port = _free_port()
    board = subprocess.Popen(
        [sys.executable, "-c", "from tensorboard.main import run_main; run_main()",
         "--logdir", str(root / "runs"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    run_ids = [f"{r}/{TENSORBOARD_DIR}" for r in run_ids]  # TensorBoard names a run by its folder
    try:
        deadline = time.monotonic() + START_S
        runs: list[str] = []
        while sorted(runs) != sorted(run_ids):
            assert board.poll() is None, board.stdout.read() if board.stdout else ""
            assert time.monotonic() < deadline, f"TensorBoard lists {runs}"
            time.sleep(1)
            try:
                runs = _get_json(f"{base}/data/runs")
            except OSError:
                continue
        tags = _get_json(f"{base}/data/plugin/scalars/tags")
        assert all("train/loss_train_nats" in tags[r] for r in run_ids)
        query = f"run={run_ids[0]}&tag=train/loss_train_nats"
        loss = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [step for _, step, _ in loss] == list(range(120))

        # the Time Series page, filtered to the training loss; headless chromium has no WebGL
        # here, so TensorBoard's forceSVG flag draws the same chart as SVG
        page = f"{base}/?tagFilter=loss_train_nats&forceSVG=true#timeseries"
        proc = chromium(page, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=15000")
        missing = [r for r in run_ids if r not in proc.stdout]
        assert not missing, f"runs not on the page: {missing}; stderr: {proc.stderr[-2000:]}"
        # the card draws once its data arrived: on a busy machine that can be after the
        # budget of virtual time, so a blank card is taken again (5 tries at most)
        for attempt in range(5):
            shot = tmp_path / f"tensorboard_scalars_{attempt}.png"
            chromium(page, tmp_path / f"profile-shot{attempt}", f"--screenshot={shot}",
                      "--window-size=1400,1000", "--virtual-time-budget=60000")  # fmt: skip
            if _coloured_pixels(shot) > 1500:
                break
        print(f"screenshot: {shot}")
        assert _coloured_pixels(shot) > 1500, f"no curve drawn: {shot}"
    finally:
        board.terminate()
        board.wait(timeout=30)


def _coloured_pixels(png: Path) -> int:
    """Pixels of a saturated colour inside the chart card (the runs' curves: the card's
    axes, grid and step marker are greys; the runs list, its coloured dots and the orange
    header lie outside the crop)."""
    import numpy as np
    from PIL import Image

    hsv = np.asarray(Image.open(png).convert("HSV").crop((360, 215, 700, 445)))
    return int(((hsv[..., 1] > 120) & (hsv[..., 2] > 60)).sum())
