"""The anomaly summary evaluated like a detector: a labelled suite of synthetic runs, precision and recall.

Each case is a synthetic run in the exact record schema (``tick_lightning.reporting.synthetic``) with
anomalies planted at known steps and layers, or none (a healthy run). ``find_anomalies`` runs on it and
every finding is matched against the labels:

* a **planted anomaly is found** when some finding has one of its accepted kinds, its layer (``None``:
  any layer, for model-wide events) and a step range ``[step, last_step]`` that overlaps the label's;
* a **finding is a true positive** when it matches some label of its run; every finding of a healthy
  run is a false positive.

Recall = planted anomalies found / planted; precision = true-positive findings / findings. Targets
(issue 18): every planted anomaly found, at most one finding per healthy run. ``--seeds`` repeats every
case with other random draws (noise, layer sizes, the loss spike's per-layer factors).

    .venv/bin/python benchmarks/anomaly_suite.py [--seeds 5] [--dir /tmp/anomaly-suite]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from tick_lightning.reporting import find_anomalies, load_run
from tick_lightning.reporting.anomalies import Finding, Thresholds
from tick_lightning.reporting.synthetic import synthetic_parameter_names, write_synthetic_run

NAMES = synthetic_parameter_names(16)
NORM = "encoder.layer.1.output.LayerNorm"
END = 10**9  # "until the end of the run"


class Label(NamedTuple):
    """A planted anomaly: one of ``kinds`` at ``layer`` (``None``: any) somewhere in steps ``[first, last]``."""

    kinds: frozenset[str]
    layer: str | None
    first: int
    last: int

    def matches(self, f: Finding) -> bool:
        return (f.kind in self.kinds and (self.layer is None or f.layer == self.layer)
                and f.step <= self.last and f.last_step >= self.first)


def label(kinds: str, layer: str | None, first: int, last: int | None = None) -> Label:
    return Label(frozenset(kinds.split()), layer, first, first if last is None else last)


class Case(NamedTuple):
    name: str
    options: dict
    labels: tuple[Label, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.labels


NOISY = {"grad_noise": 0.3}  # real runs' gradient norms vary more than the synthetic default's 10 %

CASES: tuple[Case, ...] = (
    # planted anomalies
    Case("loss spike between ticks", {"ticks": 20, "dense": True, "loss_spike": (45, 1e3), **NOISY},
         (label("loss_spike", "", 45),)),
    Case("loss spike at a tick", {"ticks": 20, "loss_spike": (40, 1e3), **NOISY}, (label("loss_spike", "", 40),)),
    Case("one layer's gradient blown up at one tick", {"ticks": 30, "spike": (100, NAMES[2], 1e3), **NOISY},
         (label("exploding_grad", NAMES[2], 100),)),
    Case("dead layer (zero gradient)", {"ticks": 30, "dead_layer": NAMES[4], **NOISY},
         (label("dead_grad", NAMES[4], 0, END),)),
    Case("layer frozen by mistake", {"ticks": 30, "frozen_layer": NAMES[6], **NOISY},
         (label("frozen", NAMES[6], 0, END),)),
    Case("non-finite loss at a tick", {"ticks": 20, "nonfinite_step": 50},
         (label("nonfinite_loss", "", 50), label("nonfinite_grad", NAMES[7], 50))),
    Case("non-finite loss between ticks", {"ticks": 20, "dense": True, "nonfinite_step": 73},
         (label("nonfinite_loss", "", 73),)),
    Case("learning rate too high, diverging", {"ticks": 30, "layers": 16, "diverge_step": 150, "dense": True},
         (label("update_ratio_high loss_spike grad_spike", None, 150, END),)),
    Case("norm-layer input outliers", {"ticks": 30, "norm_outlier": (60, NORM, 1e4)},
         (label("saturating_norm_input", NORM, 60),)),
    # healthy runs
    Case("healthy: default", {"ticks": 30}),
    Case("healthy: noisy gradients, dense series", {"ticks": 60, "dense": True, **NOISY}),
    Case("healthy: converging (loss 0.69 -> 0.01)", {"ticks": 100, "layers": 16, "converge": True, "dense": True,
                                                      **NOISY}),
    Case("healthy: Adam's first steps", {"ticks": 20, "every": 1, "adam_start": True}),
    Case("healthy: fp16 AMP, two ranks", {"ticks": 30, "amp": True, "ranks": 2}),
)


class Result:
    """One case at one seed: its findings, which labels were found, which findings are true positives."""

    def __init__(self, case: Case, seed: int, findings: list[Finding]) -> None:
        self.case, self.seed, self.findings = case, seed, findings
        self.found = [any(lab.matches(f) for f in findings) for lab in case.labels]  # per label
        self.true_positive = [any(lab.matches(f) for lab in case.labels) for f in findings]  # per finding


def run_case(case: Case, seed: int, directory: Path, thresholds: Thresholds | None = None) -> Result:
    options = {"layers": 8, **case.options, "seed": seed}
    run_dir = directory / f"{case.name.replace(' ', '_').replace(':', '').replace(',', '')}-{seed}"
    if not run_dir.exists():  # written once, judged under any thresholds
        write_synthetic_run(run_dir, **options)
    return Result(case, seed, find_anomalies(load_run(run_dir), thresholds or Thresholds()))


def run_suite(directory: Path, seeds: range | list[int] = (0,), cases: tuple[Case, ...] = CASES,
              thresholds: Thresholds | None = None) -> list[Result]:
    return [run_case(case, seed, directory, thresholds) for seed in seeds for case in cases]


def scores(results: list[Result]) -> dict[str, float]:
    planted = sum(len(r.found) for r in results)
    found = sum(sum(r.found) for r in results)
    findings = sum(len(r.findings) for r in results)
    tp = sum(sum(r.true_positive) for r in results)
    healthy = [r for r in results if r.case.healthy]
    return {
        "planted": planted, "found": found, "recall": found / planted if planted else float("nan"),
        "findings": findings, "true_positive": tp, "precision": tp / findings if findings else float("nan"),
        "healthy_runs": len(healthy), "max_findings_healthy": max((len(r.findings) for r in healthy), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="random draws per case (default 5)")
    parser.add_argument("--dir", default=None, help="where to write the runs (default: a temporary directory)")
    args = parser.parse_args()
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="anomaly-suite-"))
    start = time.perf_counter()
    results = run_suite(directory, range(args.seeds))
    seconds = time.perf_counter() - start
    print("| case | planted found | findings (true positive) | seeds |\n|---|---|---|---|")
    for case in CASES:
        rs = [r for r in results if r.case is case]
        found = f"{sum(sum(r.found) for r in rs)}/{sum(len(r.found) for r in rs)}" if case.labels else "—"
        findings = sum(len(r.findings) for r in rs)
        tp = sum(sum(r.true_positive) for r in rs)
        print(f"| {case.name} | {found} | {findings} ({tp}) | {len(rs)} |")
    s = scores(results)
    print(f"\nrecall {s['recall']:.3f} ({s['found']}/{s['planted']} planted anomalies found), "
          f"precision {s['precision']:.3f} ({s['true_positive']}/{s['findings']} findings), "
          f"most findings on a healthy run: {s['max_findings_healthy']} (target <= 1); {seconds:.1f} s")
    for r in results:  # what a person would have to read for nothing
        for f, tp in zip(r.findings, r.true_positive):
            if not tp:
                print(f"  false positive [{r.case.name}, seed {r.seed}]: step {f.step}-{f.last_step} "
                      f"{f.layer or '(run)'} {f.kind} value {f.value:.3g} ref {f.reference:.3g} {f.detail}")
        for lab, ok in zip(r.case.labels, r.found):
            if not ok:
                print(f"  missed [{r.case.name}, seed {r.seed}]: {sorted(lab.kinds)} at {lab.layer} {lab.first}")
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
