"""After a run: the tick report in ``<run_dir>/report`` and the short summary printed at the end."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union


def make_report(run_dir: Path) -> Optional[Path]:
    """Write ``run_dir/report`` with ``tick_lightning.report`` (None when the run recorded no ticks)."""
    from tick_lightning.reporting import report
    from tick_lightning.store import has_records

    ticks = run_dir / "ticks"
    if not has_records(ticks):  # ticks switched off, or the run ended before its first tick
        return None
    try:
        out = report(ticks, run_dir / "report")
    except Exception as err:  # the run's results are already saved; a report bug must not lose them
        print(f"warning: the tick report failed ({type(err).__name__}: {err}); retry with "
              f"`tick-lightning report {run_dir}`", file=sys.stderr)
        return None
    return Path(out) if out is not None else run_dir / "report"


def summarize_ticks(ticks_dir: Union[str, os.PathLike], max_rows: int = 12):
    """A small table of the ticks (step, loss, lr, global grad norm, ...) as a pandas DataFrame.

    Example:
        >>> summarize_ticks("runs/demo/ticks")  # doctest: +SKIP
    """
    from tick_lightning.store import load_ticks

    df = load_ticks(ticks_dir)
    keys = {("loss", "", "value"): "loss", ("lr", "group0", "lr"): "lr", ("grad", "", "norm"): "grad_norm",
            ("time", "", "step_seconds"): "step_s"}
    df = df[df["rank"] == df["rank"].min()]
    sel = df[[(s, n, t) in keys for s, n, t in zip(df["state"], df["name"], df["stat"])]]
    table = sel.assign(col=[keys[(s, n, t)] for s, n, t in zip(sel["state"], sel["name"], sel["stat"])])
    table = table.pivot_table(index="step", columns="col", values="value", aggfunc="last")
    updates = df[(df["state"] == "update") & (df["stat"] == "ratio")].groupby("step")["value"].median()
    if len(updates):
        table["update_ratio_median"] = updates
    if len(table) > max_rows:
        idx = sorted(set(list(table.index[:: max(1, len(table) // (max_rows - 1))]) + [table.index[-1]]))
        table = table.loc[idx]
    return table


def print_summary(run_dir: Path, metrics: dict, report_path: Optional[Path]) -> None:
    """Print the run directory, a short tick table, the final metrics and the report path."""
    print(f"\nrun directory: {run_dir}")
    from tick_lightning.store import has_records

    if has_records(run_dir / "ticks"):
        try:
            print("ticks:\n" + summarize_ticks(run_dir / "ticks").to_string(float_format=lambda v: f"{v:.4g}"))
        except FileNotFoundError:
            print("ticks: none recorded")
    for stage in ("validate", "test"):
        if stage in metrics:
            print(f"{stage}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics[stage].items()))
    print(f"model: {run_dir / 'model'}")
    print(f"report: {report_path}" if report_path else "report: none (no ticks recorded)")
    sys.stdout.flush()
