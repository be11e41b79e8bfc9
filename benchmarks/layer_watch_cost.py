"""Host cost of the flight recorder's layer watch as the parameter count grows, beside the dense spike watch.

At every flush of the dense rows (every ``flight_window // 2`` = 64 steps by default) ``TickCallback`` hands
the host copy to two watches: ``SpikeWatch`` (the loss and the global gradient norm: a few series) and
``LayerWatch`` (every parameter's gradient norm: one median and one MAD per parameter over a ``window`` of
steps). The layer watch's work grows with the number of parameter *tensors* (not their size): 41 for the tiny
BERT of the tests, ~200 for BERT-base, ~290 for Llama-2-7B, ~720 for Llama-2-70B. (With
``flight=["input_absmax"]`` a second ``LayerWatch`` runs the same code over the norm layers: 2 per block
against 9-16 parameter tensors, so read its cost off a smaller row of the same table.) This script times both
on synthetic log-normal gradient norms (numbers are numbers to a median), one flush after another as in a fit,
and prints each one's milliseconds per flush and per training step, and the layer watch's cost as a ratio of
the spike watch's.

    python benchmarks/layer_watch_cost.py
    python benchmarks/layer_watch_cost.py --tensors 41,290,723,3000 --flushes 40
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from tick_lightning.triggers import LayerWatch, SpikeWatch


def flushes(rng: np.random.Generator, tensors: int, rows: int, count: int):
    """``count`` flushes of ``rows`` steps: squared norms ``[rows, tensors]`` drifting slowly, as a fit's do."""
    scale = rng.lognormal(0.0, 2.0, tensors)
    for i in range(count):
        drift = np.exp(-0.01 * (i * rows + np.arange(rows)))[:, None]
        yield (list(range(i * rows, (i + 1) * rows)),
               (scale * drift * rng.lognormal(0.0, 0.3, (rows, tensors))) ** 2)


def time_watches(tensors: int, rows: int, count: int, window: int, seed: int = 0) -> tuple[list, list]:
    layer, spike = LayerWatch(window=window), SpikeWatch(window=window)
    present = np.ones((rows, tensors), bool)
    layer_s, spike_s = [], []
    for steps, sumsq in flushes(np.random.default_rng(seed), tensors, rows, count):
        dense = {"loss": (np.log1p(np.arange(rows, dtype=np.float64)), np.ones(rows, bool)),
                 "grad_norm": (np.sqrt(sumsq.sum(axis=1)), np.ones(rows, bool))}
        t0 = time.perf_counter()
        spike.observe(steps, dense)
        t1 = time.perf_counter()
        layer.observe(steps, sumsq, present)
        t2 = time.perf_counter()
        spike_s.append(t1 - t0)
        layer_s.append(t2 - t1)
    return layer_s, spike_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", default="41,200,290,723,3000", help="parameter tensor counts, comma-separated")
    p.add_argument("--rows", type=int, default=64, help="steps per flush (flight_window // 2 by default)")
    p.add_argument("--window", type=int, default=128, help="the watches' trailing window (flight_window)")
    p.add_argument("--flushes", type=int, default=30, help="flushes timed per size (the first 3 are not counted)")
    args = p.parse_args(argv)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, numpy {np.__version__}; "
          f"{args.rows} steps per flush, window {args.window}, median of {args.flushes - 3} flushes")
    print(f"{'tensors':>8} {'layer ms/flush':>15} {'spike ms/flush':>15} {'layer us/step':>14} {'layer/spike':>12}")
    for tensors in (int(t) for t in args.tensors.split(",")):
        layer_s, spike_s = time_watches(tensors, args.rows, args.flushes, args.window)
        layer, spike = statistics.median(layer_s[3:]), statistics.median(spike_s[3:])  # past the window's filling
        print(f"{tensors:>8} {layer * 1e3:>15.2f} {spike * 1e3:>15.2f} {layer / args.rows * 1e6:>14.1f} "
              f"{layer / spike:>12.1f}")


if __name__ == "__main__":
    main()
