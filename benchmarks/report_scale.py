"""Report render time on a large synthetic run: 10,000 ticks x 1,000 parameters, written with TickWriter.

The run records, per tick, the loss, learning rate, global gradient norm, two norm-layer inputs and, per
parameter, the weight norm, the gradient norm and the update/weight ratio: 3,000+ values a tick, 30 million
rows. (The full five-statistic set is 12 per parameter, 120 million rows: use --stats full to measure it, with
memory to match.) Writing happens once (reused with --keep); then the report is timed stage by stage and
compared with the one-minute target of issue 7.

    .venv/bin/python benchmarks/report_scale.py [--ticks 10000] [--params 1000] [--dir /tmp/tick-report-scale]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

from tick_lightning.reporting import find_anomalies, load_run
from tick_lightning.reporting.anomalies import Thresholds
from tick_lightning.reporting.figures import all_figures
from tick_lightning.reporting.synthetic import FULL_STATS, write_synthetic_run

LIGHT = {"weight": ("norm",), "grad": ("norm",), "update": ("ratio",)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ticks", type=int, default=10_000)
    p.add_argument("--params", type=int, default=1_000)
    p.add_argument("--stats", choices=("light", "full"), default="light")
    p.add_argument("--dir", default="/tmp/tick-report-scale")
    p.add_argument("--keep", action="store_true", help="reuse an existing run in --dir")
    args = p.parse_args()
    run_dir = Path(args.dir) / "ticks"
    out_dir = Path(args.dir) / "report"
    if not (args.keep and run_dir.exists()):
        shutil.rmtree(args.dir, ignore_errors=True)
        t = time.perf_counter()
        write_synthetic_run(run_dir, ticks=args.ticks, every=1, layers=args.params, norm_modules=2,
                            spike=(args.ticks // 2, "encoder.layer.0.mlp.weight", 1e3), nonfinite_step=args.ticks // 3,
                            param_stats=LIGHT if args.stats == "light" else FULL_STATS)
        print(f"write (TickWriter, {args.ticks} parts + compaction): {time.perf_counter() - t:.1f} s")
    # wall time, and this process's CPU time: on a shared machine the CPU time is the reproducible number
    times, cpu = {}, {}

    def stage(name, fn):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        times[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
        return result

    run = stage("load", lambda: load_run(run_dir))
    findings = stage("anomalies", lambda r=run: find_anomalies(r, Thresholds()))
    out_dir.mkdir(parents=True, exist_ok=True)
    stage("figures", lambda r=run, f=findings: all_figures(r, out_dir, f))
    rows, ticks, kinds = len(run.records), len(run.steps), sorted({f.kind for f in findings})
    n_findings = len(findings)
    del run, findings  # one run in memory at a time: peak RSS below is report()'s own
    gc.collect()
    # the whole public entry point, as a user runs it (load + anomalies + figures + html)
    from tick_lightning.reporting import report

    stage("report() end to end", lambda: report(run_dir, out_dir))
    print(f"rows read: {rows:,}  ticks: {ticks:,}  findings: {n_findings} ({kinds})")
    for k, v in times.items():
        print(f"{k:>22}: {v:6.1f} s wall  {cpu[k]:6.1f} s CPU")
    total = times["report() end to end"]
    print(f"end-to-end wall / 60 s target = {total / 60:.2f}  ({'PASS' if total < 60 else 'FAIL'}); "
          f"CPU / 60 s = {cpu['report() end to end'] / 60:.2f}")
    print(json.dumps({"wall": {k: round(v, 2) for k, v in times.items()}, "cpu": {k: round(v, 2) for k, v in cpu.items()}}))


if __name__ == "__main__":
    main()
