"""Which clipping rule stays quiet on a healthy fit and still catches a spike? Rules replayed on recorded norms.

Real fits record every step's global gradient norm (the dense series) and every tensor's norm (the flight recorder
with a ring longer than the run): healthy fits of ``flight_root_cause.py``'s tiny BERT on SST-2 (500 steps, the
setting of ``guard_faults.py``), where the norm rises by decades once the model starts to learn. Each candidate
rule is then replayed in numpy on those series, as recorded and with a fault planted in them (the norm x10 at step
310, x100 at 310-311, x1.3**k at 310+k for 20 steps; per tensor on one tensor: x1e4 at 310-311 and the growth):
its interventions on the healthy series are false ones, those at 310-334 on the planted ones are detections.

Rules: ZClip as published (linear space, EMA fed the clipped norm; ``alpha`` 0.97, ``z`` 2.5, warm-up 25) and the
same on the log of the norm (the guard's ``zclip``, ``z`` 2.5 and 3); per tensor, AdaGC's ratio rule (clip above
``ratio`` x the bias-corrected EMA of the tensor's clipped norms; ratio 4 and 10; the paper's 1.05 clips nearly
every step by design) and the log-space ZClip rule per tensor (the guard's ``clip``, ``z`` 3, 3.5, 4). Skipping:
OLMo-core's rolling mean and standard deviation of the loss and the norm (``z`` 6), and the same with the norm's log
(the guard's ``skip``, ``z`` 5).

    python benchmarks/guard_rules.py --sst2 /work/shared/data/sst2/train.tsv --seeds 3

A replay is not a fit (a clip changes the steps after it); ``guard_faults.py`` measures the fits.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def record(args, seed: int, out: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """One healthy fit; its global norms [steps], per-tensor norms [steps, tensors], names, losses [steps]."""
    import flight_root_cause as frc
    import lightning as L

    from tick_lightning import TickCallback, load_dense, load_flight

    data = frc.sst2_data(args.sst2, args.vocab, args.seq, limit=args.rows)
    torch.manual_seed(seed)
    model = frc.Classifier(args.vocab, args.seq, args.hidden, args.layers, seed, args.lr)
    tick = TickCallback(ticks="every:50", dirpath=out, log_to_loggers=False, flight_window=args.steps + 8)
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[tick])
    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.Subset(data, range(len(data) - 1000))
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, generator=g))
    flight = load_flight(out).sort_index()
    dense = load_dense(out)
    return dense.grad_norm.to_numpy(), flight.to_numpy(), list(flight.columns), dense.loss.to_numpy()


def skip(loss: np.ndarray, norm: np.ndarray, z: float, log_norm: bool, window: int = 128,
         warmup: int = 64) -> list[int]:
    """Steps OLMo-core's rule skips: the loss or the norm (``log_norm``: its log) more than ``z`` sample standard
    deviations above the mean of its last ``window`` values (every value enters)."""
    hist: dict = {"loss": [], "norm": []}
    out = []
    for t, (a, b) in enumerate(zip(loss, np.log(norm) if log_norm else norm)):
        hit = False
        for key, v in (("loss", a), ("norm", b)):
            h = np.asarray(hist[key][-window:])
            if len(h) >= warmup and v - h.mean() > z * h.std(ddof=1):
                hit = True
            hist[key].append(v)
        if hit:
            out.append(t)
    return out


def zclip(x: np.ndarray, z: float = 2.5, alpha: float = 0.97, warmup: int = 25, log: bool = False,
          eps: float = 1e-6) -> np.ndarray:
    """Clipped rows (bool ``x.shape``) of ZClip on columns ``x`` [steps, columns]; ``log``: on their log."""
    v = np.log(np.maximum(x, 1e-30)) if log else x
    mean, var = np.zeros(v.shape[1]), np.zeros(v.shape[1])
    clipped = np.zeros(v.shape, dtype=bool)
    for t, row in enumerate(v):
        if t < warmup:
            mean, var = v[:t + 1].mean(0), v[:t + 1].var(0)
            continue
        std = np.sqrt(var)
        score = (row - mean) / (std + eps)
        over = score > z
        limit = mean + z * z * std / np.where(over, score, 1.0)
        effective = np.where(over, limit, row)
        clipped[t] = over
        mean = alpha * mean + (1 - alpha) * effective
        var = alpha * var + (1 - alpha) * (effective - mean) ** 2
    return clipped


def adagc(x: np.ndarray, ratio: float, beta: float = 0.98, warmup: int = 25) -> np.ndarray:
    """AdaGC's per-tensor ratio rule (after its warm-up): clip above ``ratio`` x the bias-corrected EMA."""
    ema = np.zeros(x.shape[1])
    clipped = np.zeros(x.shape, dtype=bool)
    for t, row in enumerate(x):
        running = ema / (1 - beta ** t) if t else np.zeros_like(ema)
        over = (t >= warmup) & (row > ratio * running)
        clipped[t] = over
        ema = beta * ema + (1 - beta) * np.where(over, ratio * running, row)
    return clipped


def planted(x: np.ndarray, kind: str, column: int | None = None, at: int = 310) -> np.ndarray:
    x = x.copy()
    cols = slice(None) if column is None else column
    if kind == "x10":
        x[at, cols] *= 10
    elif kind in ("x100", "x1e4"):
        x[at:at + 2, cols] *= 100 if kind == "x100" else 1e4
    else:
        for k in range(20):
            x[at + k, cols] *= 1.3 ** k
    return x


GLOBAL = {"zclip linear z2.5 (published)": dict(z=2.5), "zclip log z2.5": dict(z=2.5, log=True),
          "zclip log z3 (guard)": dict(z=3.0, log=True)}
SKIP = {"OLMo-core: z 6, norm linear": dict(z=6.0, log_norm=False), "z 5, norm linear": dict(z=5.0, log_norm=False),
        "z 5, log norm (guard)": dict(z=5.0, log_norm=True), "z 4, log norm": dict(z=4.0, log_norm=True)}
TENSOR = {"AdaGC ratio 4": ("adagc", 4.0), "AdaGC ratio 10": ("adagc", 10.0), "log z3": ("log", 3.0),
          "log z3.5": ("log", 3.5), "log z4 (guard)": ("log", 4.0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sst2", default="../shared/data/sst2/train.tsv")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=24)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for seed in range(args.seeds):
        out = Path(tempfile.mkdtemp(prefix="guard-rules-"))
        try:
            runs.append(record(args, seed, out / "ticks"))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.platform()}, torch {torch.__version__}; "
          f"{args.seeds} healthy fits of {args.steps} steps; global norm at steps 0 / 100 / 300 (seed 0): "
          f"{runs[0][0][0]:.3g} / {runs[0][0][100]:.3g} / {runs[0][0][300]:.3g}\n")
    print("global norm: steps clipped on the healthy fit | detections at 310-334 for x10, x100, x1.3^k (per seed)")
    for name, kw in GLOBAL.items():
        cells = []
        for norms, _, _, _ in runs:
            x = norms[:, None]
            found = [int(zclip(planted(x, k), **kw)[310:335].sum()) for k in ("x10", "x100", "growth")]
            cells.append(f"{int(zclip(x, **kw).sum())} | {found[0]}, {found[1]}, {found[2]}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nper tensor: steps with any clip / tensor-steps clipped on the healthy fit | detections at 310-334 of "
          "x1e4 and x1.3^k on a query weight and on the classifier (per seed)")
    for name, (kind, value) in TENSOR.items():
        cells = []
        for _, x, names, _ in runs:
            def rule(m, kind=kind, value=value):
                return adagc(m, value) if kind == "adagc" else zclip(m, z=value, log=True)
            c = rule(x)
            cols = [names.index("model.bert.encoder.layer.2.attention.self.query.weight"),
                    names.index("model.classifier.weight")]
            found = [int(rule(planted(x, k, col))[310:335, col].sum()) for col in cols for k in ("x1e4", "growth")]
            cells.append(f"{int(c.any(1).sum())} / {int(c.sum())} | {', '.join(map(str, found))}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nskip: steps skipped on the healthy fit | skipped at 310 with the norm x3, x10, x100 and the loss x2, x3 "
          "(per seed)")
    for name, kw in SKIP.items():
        cells = []
        for norms, _, _, loss in runs:
            found = []
            for factor in (3, 10, 100):
                n = norms.copy()
                n[310] *= factor
                found.append(310 in skip(loss, n, **kw))
            for factor in (2, 3):
                v = loss.copy()
                v[310] *= factor
                found.append(310 in skip(v, norms, **kw))
            cells.append(f"{len(skip(loss, norms, **kw))} | {', '.join('yes' if f else 'no' for f in found)}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if math.isnan(runs[0][0][0]):
        print("(the first step's norm is NaN)")


if __name__ == "__main__":
    main()
