"""What the entry point adds to ``Trainer(...)``, side by side, through Lightning's own entry-point lookup.

Each round starts one fresh interpreter per variant (interleaved: A B C, B C A, ...), because the cost that
matters is the first ``Trainer(...)`` of a process (the import of ``tick_lightning.entry``):

  without   a tick-lightning ``.dist-info`` with no ``lightning.pytorch.callbacks_factory`` entry point
  unset     the entry point registered as in pyproject.toml, no ``TICK_LIGHTNING*`` variable set
  enabled   (``--enabled``) the entry point registered, ``TICK_LIGHTNING=1``: builds a TickCallback, the price
            of asking for ticks, not of having the package installed

The ``.dist-info`` is written to a temporary directory first on ``PYTHONPATH``, so it shadows an installed
tick-lightning and the numbers do not depend on how the package was installed. In every interpreter:
``cold`` is the first ``Trainer(...)`` after ``import lightning``, ``warm`` the median of the next 20, and
``factory`` times ``EntryPoint.load()`` + the call, the part the entry point adds, in a separate process
with nothing of tick-lightning imported yet.

    python benchmarks/plugin_overhead.py                        # 1 round, < 1 min on a 2-core machine
    python benchmarks/plugin_overhead.py --rounds 5 --enabled
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
GROUP = "lightning.pytorch.callbacks_factory"
VARIANTS = ("without", "unset", "enabled")

CHILD = r"""
import json, os, statistics, sys, tempfile, time
t0 = time.perf_counter()
import lightning as L
t_import = time.perf_counter() - t0
kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tempfile.mkdtemp())
t0 = time.perf_counter(); L.Trainer(**kwargs); cold = time.perf_counter() - t0
warm = []
for _ in range(20):
    t0 = time.perf_counter(); L.Trainer(**kwargs); warm.append(time.perf_counter() - t0)
print(json.dumps({"import": t_import, "cold": cold, "warm": statistics.median(warm)}))
"""

FACTORY = r"""
import json, sys, time
from importlib.metadata import entry_points
import lightning  # what a Trainer has imported anyway
(ep,) = [e for e in entry_points(group=sys.argv[1]) if e.name == "tick_lightning"]
t0 = time.perf_counter(); result = ep.load()(); t = time.perf_counter() - t0
print(json.dumps({"factory": t, "returned": len(result),
                  "tick_modules": sorted(m for m in sys.modules if m.startswith("tick_lightning"))}))
"""


def write_dist(site: Path, with_entry_point: bool) -> None:
    dist = site / "tick_lightning-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tick-lightning\nVersion: 0.1.0\n")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    lines = [f"[{GROUP}]"] + [f"{k} = {v}" for k, v in declared.items()] if with_entry_point else []
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")


def run(code: str, site: Path, enabled: bool, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICK_LIGHTNING")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), OMP_NUM_THREADS="1")
    if enabled:
        env["TICK_LIGHTNING"] = "1"
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--enabled", action="store_true", help="also measure TICK_LIGHTNING=1")
    args = parser.parse_args()
    variants = VARIANTS if args.enabled else VARIANTS[:2]

    tmp = Path(tempfile.mkdtemp())
    sites = {"without": tmp / "without", "unset": tmp / "with", "enabled": tmp / "with"}
    write_dist(sites["without"], with_entry_point=False)
    write_dist(sites["unset"], with_entry_point=True)

    rows: dict[str, list[dict]] = {v: [] for v in variants}
    factory: dict[str, list[dict]] = {v: [] for v in variants if v != "without"}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            rows[variant].append(run(CHILD, sites[variant], variant == "enabled"))
        for variant in factory:
            factory[variant].append(run(FACTORY, sites[variant], variant == "enabled", GROUP))

    print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {args.rounds} rounds")
    med = {v: {k: statistics.median(row[k] for row in rows[v]) for k in ("cold", "warm")} for v in variants}
    print(f"{'variant':<9} {'first Trainer (ms)':>19} {'later Trainers (ms)':>20} {'ratio first':>12}")
    for v in variants:
        print(f"{v:<9} {1e3 * med[v]['cold']:>19.1f} {1e3 * med[v]['warm']:>20.2f} "
              f"{med[v]['cold'] / med['without']['cold']:>12.3f}")
    for v, samples in factory.items():
        t = statistics.median(s["factory"] for s in samples)
        print(f"entry point load + call, {v}: {1e3 * t:.2f} ms (median of {len(samples)}), returned "
              f"{samples[0]['returned']} callback(s), tick_lightning modules imported: {samples[0]['tick_modules']}")


if __name__ == "__main__":
    main()
