"""Checkpoints: atomic, checksummed, the last two kept; loaded safely or not at all.

``checkpoints/ckpt_<step:09d>.pt`` holds everything a resume needs (model, optimizer,
scheduler, scaler, the next step, RNG states, the analysis warm-start state and the resolved
config); ``ckpt_<step:09d>.sha256`` beside it is written after the checkpoint itself, so a
checkpoint without a matching checksum (a write cut short) is skipped for the previous one,
and a warning event says so.

A checksum proves nothing about who wrote a file, so loading never runs code:
``torch.load(weights_only=True)`` with an allow-list of the numpy types the saved RNG
state needs and nothing else. A checkpoint that fails that load was not written by
``decon``: it is refused (:class:`UnsafeCheckpointError`, the run ends ``failed`` naming
the file), never skipped for an older one (docs/cluster.md, "Who may write a sweep root").
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deconcnn_cli.contract import CHECKPOINT_DIR, CHECKPOINT_PATTERN, EXIT_FAILED, checkpoint_name
from deconcnn_cli.errors import DeconError
from deconcnn_cli.fileio import atomic_write_bytes, read_regular

KEEP_LAST = 2
_NAME = re.compile(CHECKPOINT_PATTERN)


class UnsafeCheckpointError(DeconError):
    """A checkpoint that does not load with ``weights_only=True`` and the allow-list: refused
    unread (exit 1, the run is ``failed``)."""

    exit_code = EXIT_FAILED


def safe_globals() -> list[Any]:
    """What a checkpoint may hold beyond tensors and plain Python values: the pieces of the
    numpy RNG state (``np.random.get_state()``: an ``ndarray`` of ``uint32``), nothing else."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(next_step, path) pairs, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Restore the saved generators. States are CPU byte tensors (``torch.set_rng_state`` and
    ``torch.cuda.set_rng_state`` take nothing else); CUDA states are restored for the devices
    both hosts have, so a requeue onto a node with another GPU count still resumes. (Nothing
    in a run draws from these global generators: data and metrics use seeded generators of
    their own; they are kept for code that might.)"""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch_cpu"].cpu())
    saved = states.get("torch_cuda") or []
    if saved and torch.cuda.is_available():
        for index in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[index].cpu(), index)


def save_checkpoint(run_dir: Path, next_step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` for resuming at ``next_step``; prune to the last ``KEEP_LAST``."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({**state, "next_step": next_step, "rng": rng_states()}, buf)
    data = buf.getvalue()
    path = folder / checkpoint_name(next_step)
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path.with_suffix(".sha256"), f"{digest}  {path.name}\n".encode())
    for _, old in list_checkpoints(run_dir)[KEEP_LAST:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def _verified_bytes(path: Path) -> bytes | None:
    try:
        data = read_regular(path)
        expected = read_regular(path.with_suffix(".sha256")).decode().split()[0]
    except (OSError, IndexError):
        return None
    return data if hashlib.sha256(data).hexdigest() == expected else None


def _why(exc: Exception) -> str:
    """The line of torch's long refusal that names the problem (e.g. the global refused)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    line = found.group(1) if found else (text.strip().splitlines() or [type(exc).__name__])[0]
    return line.split(". ")[0].rstrip(".")[:300]


def load_checkpoint_bytes(data: bytes, path: Path) -> dict[str, Any]:
    """Unpickle a checkpoint without running anything it holds (``weights_only=True`` and
    :func:`safe_globals`); :class:`UnsafeCheckpointError` naming ``path`` if it cannot be."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {path} fails the safe load, so it was not loaded and nothing in it "
            f"ran: {_why(exc)}",
            "decon writes only checkpoints that load safely: this file came from elsewhere. "
            "Find out who wrote it (docs/cluster.md, 'Who may write a sweep root'); to resume "
            "from the previous checkpoint, delete this one and its .sha256",
        ) from None
    if not isinstance(state, dict):
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint",
            "delete it and its .sha256 to resume from the previous checkpoint",
        )
    return state


def load_latest_checkpoint(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest checkpoint whose checksum verifies, plus notes on the ones skipped for a
    missing or mismatched checksum (a write cut short).

    A verified checkpoint that fails the safe load raises :class:`UnsafeCheckpointError`:
    it is never skipped for an older one. Everything is loaded onto the CPU: RNG states
    must stay CPU tensors, and ``load_state_dict`` copies model/optimizer/scaler state onto
    the parameters' device.
    """
    skipped: list[str] = []
    for _, path in list_checkpoints(run_dir):
        data = _verified_bytes(path)
        if data is None:
            skipped.append(f"{path.name}: missing or mismatched checksum")
            continue
        return load_checkpoint_bytes(data, path), skipped
    return None, skipped
