"""The report's per-layer figures at four model sizes, for docs/report.md: can a reader read them at 2, 24, 291 and 723
parameter tensors (a toy, a small BERT, Llama-2-7B's count, Llama-2-70B's)?

Synthetic runs (``tick_lightning.reporting.synthetic.write_synthetic_run``: a transformer-shaped list of parameters, one planted
gradient spike), rendered by the report's own figure functions into ``docs/report_figures/``.

    python benchmarks/report_figures.py --out docs/report_figures
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = (2, 24, 291, 723)


def main(argv=None) -> None:
    from tick_lightning.reporting import figures, find_anomalies, load_run
    from tick_lightning.reporting.synthetic import write_synthetic_run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/report_figures")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures.DPI = 60
    for n in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = write_synthetic_run(Path(tmp) / "run", ticks=30, every=10, layers=n,
                                          spike=(150, "encoder.layer.0.mlp.weight", 1e3) if n > 3 else None)
            run = load_run(run_dir)
            found = find_anomalies(run)
            for name, draw in (("grad_norm_heatmap", figures.grad_heatmap), ("weight_norms", figures.weight_norms),
                               ("update_ratio_heatmap", figures.update_heatmap)):
                path = draw(run, out / f"{name}_{n}.png", found)
                print(path, path.stat().st_size // 1024, "KB")


if __name__ == "__main__":
    main()
