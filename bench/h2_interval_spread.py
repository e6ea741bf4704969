"""How H2's bootstrap interval moves with the resampling seed and with the order of the runs.

The numbers docs/report.md quotes for the demo come from this script. On a sweep root (the
demo: ``decon submit --grid demo --executor local --root ROOT --wait``, a few minutes on
CPU) it builds the report's table (``decon export``'s rows, verified) and prints, per time
axis, for the overall group:

- rho and the report's interval (runs in run-id order, seed ``BOOTSTRAP_SEED``);
- the interval's lower and upper ends over seeds 0..N-1 (``--seeds``), the spread the
  report's page warns of;
- the interval with seed ``BOOTSTRAP_SEED`` when the runs are resampled in other orders (the
  export's rows, the grid's expansion): what it was before ``h2_rows`` sorted by run id.

    python bench/h2_interval_spread.py --root ROOT [--seeds 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deconcnn_cli.export import stats  # noqa: E402
from deconcnn_cli.export.dataset import collect, verify_problem  # noqa: E402
from deconcnn_cli.export.report import to_frame  # noqa: E402
from deconcnn_cli.sweep.grid import expand_grid_runs  # noqa: E402
from deconcnn_cli.sweep.profiles import load_grid

AXES = (("step", "alpha_early"), ("lr", "alpha_early_lr"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a finished sweep root")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    args = parser.parse_args()
    data = collect(args.root, verify=verify_problem)  # as `decon report` checks the runs
    df = to_frame(data)
    grid_order = [run.run_id for run in expand_grid_runs(load_grid(str(data.manifest["grid"])))]
    print(f"sweep {args.root} (grid {data.manifest['grid']}): {len(df)} runs, "
          f"{int(stats.finished(df).sum())} completed and verified")  # fmt: skip
    for time_axis, col in AXES:
        if not stats.has_values(df, col):
            print(f"{time_axis} time: no {col} values")
            continue
        rows = [stats.h2_rows(df, col, time_axis, seed=s)[0] for s in range(args.seeds)]
        report = rows[stats.BOOTSTRAP_SEED]
        lows = [r.ci_low for r in rows]
        highs = [r.ci_high for r in rows]
        print(f"{time_axis} time ({col}, {report.n_runs} runs): rho {report.rho:.3f}, "
              f"interval [{report.ci_low:.3f}, {report.ci_high:.3f}] "
              f"({report.ci_method}, seed {stats.BOOTSTRAP_SEED}, runs by run id)")  # fmt: skip
        print(f"  seeds 0-{args.seeds - 1}: lower end {min(lows):.3f} to {max(lows):.3f}, "
              f"upper end {min(highs):.3f} to {max(highs):.3f}")  # fmt: skip
        runs = df[stats.finished(df)].dropna(subset=[col, "best_val_ce"])
        for name, order in (
            ("run id (the report)", sorted(runs["run_id"])),
            ("export rows", list(runs["run_id"])),
            ("grid expansion", [r for r in grid_order if r in set(runs["run_id"])]),
        ):
            by_id = runs.set_index("run_id").loc[order]
            ci = stats.bootstrap_rho(by_id[col].to_numpy(float),
                                     by_id["best_val_ce"].to_numpy(float))  # fmt: skip
            print(f"  resampled in {name} order: [{ci.low:.3f}, {ci.high:.3f}]")


if __name__ == "__main__":
    main()
