"""``decon train``: one run of the protocol; parse -> library -> render."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from deconcnn_cli.commands.options import ProfileOpt, QuietOpt, RootOpt, SetOpt, VariantOpt
from deconcnn_cli.commands.render import render_error
from deconcnn_cli.config import (
    RunConfig,
    build_config,
    identity_dict,
    load_run_config,
    load_saved_config,
    parse_override,
    run_id,
)
from deconcnn_cli.contract import CONFIG_FILE, EXIT_FAILED, STATUS_FILE, TERMINAL_STATES
from deconcnn_cli.errors import ConfigError, DeconError, RunDirError
from deconcnn_cli.fileio import read_json
from deconcnn_cli.runenv import default_threads
from deconcnn_cli.training.rundir import (
    dict_changes,
    own_run,  # torch-free
    prepare_run_dir,
)

if TYPE_CHECKING:
    from deconcnn_cli.training.loop import RunResult


# a dedicated flag -> the config field it sets
_FLAG_PATHS = {
    "lr": ("optim", "lr"),
    "wd": ("optim", "weight_decay"),
    "seed": ("seed",),
    "epochs": ("schedule", "epochs"),
    "dataset": ("data", "dataset"),
    "data_dir": ("data", "data_dir"),
    "download": ("data", "download"),
    "batch_size": ("data", "batch_size"),
    "device": ("device",),
    "precision": ("precision",),
}


def _flags(**values: Any) -> dict[str, Any]:
    """Dedicated flags -> a nested config layer (only the flags the user gave)."""
    layer: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        *parents, leaf = _FLAG_PATHS[name]
        node = layer
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = str(value) if isinstance(value, Path) else value
    return layer


def resolve_config(
    variant: str | None,
    profile: list[str] | None,
    set_: list[str] | None,
    run_dir: Path | None,
    flags: dict[str, Any],
) -> RunConfig:
    if run_dir is not None and (run_dir / CONFIG_FILE).exists():
        # resume an existing run: its saved config is the base; flags may only re-state it
        if variant or profile:
            named = " and ".join(
                n for n, v in (("--variant", variant), ("--profile", profile)) if v
            )
            raise ConfigError(
                f"--run-dir {run_dir} resumes the run its {CONFIG_FILE} holds; {named} would "
                "describe another run",
                f"leave out {named} to resume it, or leave out --run-dir to start a new run "
                "(in --root)",
            )
        saved = load_saved_config(run_dir / CONFIG_FILE)
        base = saved.model_dump(mode="json", exclude_none=True)
        layers = [(str(run_dir / CONFIG_FILE), base)]
        layers += [(f"--set {t}", parse_override(t)) for t in set_ or []]
        if flags:
            layers.append(("command-line flags", flags))
        cfg = build_config(layers)
        _check_same_run(run_dir, saved, cfg, set_, flags)
        return cfg
    if run_dir is not None and not (variant or profile):
        if not run_dir.exists():
            raise RunDirError(
                f"--run-dir {run_dir} does not exist",
                "give the folder of an existing run (<root>/<run_id>), or --variant to start "
                "a new run",
            )
        raise RunDirError(f"{run_dir} has no {CONFIG_FILE}", "give --variant to start a new run")
    return load_run_config(
        variant=variant if (variant or profile) else "base",
        profiles=profile,
        overrides=set_,
        flags=flags,
    )


def _check_same_run(
    run_dir: Path, saved: RunConfig, cfg: RunConfig, set_: list[str] | None, flags: dict
) -> None:
    """Refuse flags that would change the result-affecting config of the run being resumed
    (also when it has ended: nothing would run, and the flags would be ignored silently)."""
    differing = [p for p, _, _ in dict_changes(identity_dict(saved), identity_dict(cfg))]
    if not differing:
        return
    changes = set(differing)
    given = [f"--{k.replace('_', '-')}" for k, path in _given_flags(flags) if path in changes]
    given += [f"--set {t}" for t in set_ or [] if t.partition("=")[0].strip() in changes]
    given = given or ["the flags"]
    raise ConfigError(
        f"--run-dir {run_dir} holds a different run: {', '.join(given)} change "
        f"{', '.join(differing)}",
        "leave them out to resume the run as it was, or leave out --run-dir to start a new "
        "run with them (in --root)",
    )


def _given_flags(layer: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``(flag, config path)`` of each dedicated flag behind a :func:`_flags` layer."""
    names = {".".join(path): flag for flag, path in _FLAG_PATHS.items()}
    out = []
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _given_flags(value, f"{path}.")
        else:
            out.append((names.get(path, path), path))
    return out


def train(
    variant: VariantOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (optim.lr).")] = None,
    wd: Annotated[float | None, typer.Option(help="Weight decay (optim.weight_decay).")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed (the only randomness).")] = None,
    epochs: Annotated[int | None, typer.Option(help="schedule.epochs.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="cifar10 | cifar100 | digits (offline, bundled).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where CIFAR lives.")] = None,
    download: Annotated[
        bool | None, typer.Option("--download/--no-download", help="Download CIFAR if missing.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="data.batch_size.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N].")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | fp32 | fp16 | bf16.")] = None,
    root: RootOpt = Path("runs"),
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Exact run directory (resume one).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop (checkpointed, resumable) after this many steps.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Torch intra-op threads (default: SLURM_CPUS_PER_TASK, else the CPUs this "
            "process may use, divided by $DECON_CONCURRENT_RUNS).",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train one run (or resume it from its newest valid checkpoint).

    Exit codes: 0 completed, diverged or already final; 1 failed (see status.json and
    events.jsonl); 2 bad input; 3 stopped by --max-steps; 4 another process owns the run;
    128+N stopped by signal N (checkpointed, resumable).
    """
    console = Console(stderr=True)
    target: Path | None = None
    try:
        flags = _flags(
            lr=lr,
            wd=wd,
            seed=seed,
            epochs=epochs,
            dataset=dataset,
            data_dir=data_dir,
            download=download,
            batch_size=batch_size,
            device=device,
            precision=precision,
        )
        cfg = resolve_config(variant, profile, set_, run_dir, flags)
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads: {threads} is not a thread count", "give 1 or more")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"--max-steps: {max_steps} is not a step count", "give 1 or more")
        target = run_dir if run_dir is not None else root / run_id(cfg)
        status = read_json(target / STATUS_FILE) or {}
        if status.get("state") in TERMINAL_STATES:
            typer.echo(f"{target}: already {status['state']} at step {status.get('step')}")
            return
        # torch loads here, not at import: `decon monitor/verify` share this CLI and must
        # answer in well under a second
        from deconcnn_cli.training.data import check_available
        from deconcnn_cli.training.device import resolve_device, resolve_precision

        check_available(cfg.data.dataset, cfg.data.data_dir, download=cfg.data.download)
        # fail before writing: the device must run the precision (the run's stored one if any)
        # (a GPU the job requires but cannot see is checked by the run itself, which records
        # the failure and its reason in the run directory)
        device = resolve_device(cfg.device, require_gpu=False)
        resolve_precision(cfg.precision, device, status.get("precision"))
        prepare_run_dir(cfg, target)
        with own_run(target):
            result = _run(cfg, target, console, quiet, max_steps, threads or default_threads())
    except DeconError as exc:
        render_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:  # recorded in the run directory by the loop; shown for the job log
        traceback.print_exc()
        typer.echo(f"error: run failed: {type(exc).__name__}: {exc}", err=True)
        if target is not None:
            typer.echo(f"hint: see {target / STATUS_FILE} and events.jsonl there", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if result.already:
        typer.echo(f"{target}: already {result.state} at step {result.steps_done}")
        return
    typer.echo(
        f"{result.state}: {target} (step {result.steps_done}) {result.reason or ''}".rstrip()
    )
    if result.exit_code:
        sys.stdout.flush()
        if result.signal_number is not None:
            stopped_by_signal.append(result.signal_number)
        raise typer.Exit(result.exit_code)


class _EventLines:
    """``--quiet``: one line per event, for a job log: the resume point, each long evaluation
    as it starts (once, however often its progress is reported), each epoch as it ends."""

    def __init__(self) -> None:
        from deconcnn_cli.training.attempt import RESUMED_AT  # torch: only once a run starts

        self.resumed_at = RESUMED_AT
        self.epoch = 0
        self.phase = ""

    def __call__(self, p: Any) -> None:
        if p.phase:
            head = p.phase.split(":")[0].removesuffix(" ...")
            if head != self.phase and not head.startswith("training"):
                # an evaluation's start, without its progress counts ("curvature at step 0 ...")
                text = p.phase if head.startswith(self.resumed_at) else f"{head} ..."
                typer.echo(f"{text} (epoch {p.epoch:.2f})" if p.steps_done else text)
            self.phase = head
            if p.phase.startswith(self.resumed_at):  # earlier epochs ended in an earlier attempt
                self.epoch = int(p.epoch)
            return
        self.phase = ""
        if int(p.epoch) > self.epoch:
            self.epoch = int(p.epoch)
            typer.echo(
                f"epoch {self.epoch} ended: step {p.steps_done}/{p.total_steps}, loss "
                f"{p.loss_train_nats:.4f}, {p.steps_per_s:.1f} step/s"
            )


# set when the run stopped on a signal: the process then exits without finalizing the
# interpreter (cli.main), whose teardown of torch and of a large model's memory takes seconds
# (docs/performance.md, "A stop inside an evaluation") that a preempted job does not have
stopped_by_signal: list[int] = []


def _run(
    cfg: RunConfig,
    target: Path,
    console: Console,
    quiet: bool,
    max_steps: int | None,
    threads: int,
) -> RunResult:
    from deconcnn_cli.training.attempt import RESUMED_AT, Progress
    from deconcnn_cli.training.loop import train_run

    if quiet:
        typer.echo(f"training {target} ({threads} thread{'s' if threads > 1 else ''})")
        return train_run(
            cfg,
            target,
            threads=threads,
            on_progress=_EventLines(),
            stop_after_steps=max_steps,
            keep_signal_handlers=True,
        )
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]:.2f} loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]:.1f} step/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[phase]}"),
    )
    with RichProgress(*columns, console=console, transient=False) as bar:
        fields = {"epoch": 0.0, "loss": "-", "rate": 0.0, "phase": "starting ..."}
        task = bar.add_task(target.name, total=None, **fields)

        def on_progress(p: Progress) -> None:
            if p.phase.startswith(RESUMED_AT):  # an event: a line of its own above the bar
                bar.console.print(f"{p.phase} (epoch {p.epoch:.2f})", markup=False)
            if p.phase:  # a metric runs before the next block of steps: say so
                bar.update(task, completed=p.steps_done, total=p.total_steps, phase=p.phase)
                return
            bar.update(
                task,
                completed=p.steps_done,
                total=p.total_steps,
                epoch=p.epoch,
                loss=f"{p.loss_train_nats:.4f}",
                rate=p.steps_per_s,
                phase="",
            )

        return train_run(
            cfg,
            target,
            threads=threads,
            on_progress=on_progress,
            stop_after_steps=max_steps,
            keep_signal_handlers=True,
        )
