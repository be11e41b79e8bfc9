"""The attention-logit early warning measured on the learning-rate grid: does it come before the loss moves?

Every run is a real Lightning fit of the decoder LM of ``benchmarks/lr_sensitivity.py`` (``LlamaForCausalLM``
from its config, character-level Tiny Shakespeare, AdamW with warmup and cosine decay, no gradient clipping
by default: the runs that degrade or diverge) with ``TickCallback``'s default flight recorder: each attention
block's logit scale ``rms(q) rms(k) sqrt(head_dim)`` and the output head's logit rms at every step, watched
online (``triggers.LayerWatch``: a climb of a decade above its recent past that stays 3 steps, ``attn_rise`` /
``logit_rise``; a jump, ``attn_jump`` / ``logit_jump``); ``warn_kind`` says which warned first.

Per run:

* ``moved_step``: the first step at which the training loss's 10-step mean stands ``--moved`` (0.25) nats
  above its lowest so far, or is non-finite: the loss moved the wrong way (in the warm-up too: at the largest
  learning rates it turns within the first 20 steps). Recorded by
  a callback of this script (a host read per step: the benchmark's, not the product's). None: it never did.
* ``warn_step``: the first warning finding (``WARNINGS``) of ``find_anomalies`` on the run's records, and its
  kind (``warn_kind``).
* ``lead = moved_step - warn_step`` when both (positive: the warning came first).

Summary per size: of the runs whose loss moved, how many were warned first and the leads; of the runs whose
loss never moved, those that ended degraded (``--near``, 0.5 nats above the best final loss of their size and
seed: a learning rate too high that never made the loss rise) and how many of them were warned, and the calm
rest, how many had a warning (false alarms) and how many warnings in all.

    python benchmarks/early_warning.py --text ../shared/data/text/tinyshakespeare.txt
    python benchmarks/early_warning.py --sizes h64l2 --lrs 0.01 1 10 --seeds 0      # a quick look

Writes every run to ``--out`` (benchmarks/results/early_warning_runs.jsonl) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lr_sensitivity import SIZES, Windows, build_lm, char_data, diverged, eval_loss, lm_module  # noqa: E402

WARNINGS = ("attn_rise", "attn_jump", "logit_rise", "logit_jump")
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 1.5, 2.0, 3.0, 4.5, 6.5, 10.0]  # the grid of docs/guard.md


def moved_step(losses: list[float], warmup: int, margin: float, span: int = 10) -> int | None:
    """The first step after ``warmup`` whose ``span``-step mean loss is ``margin`` above its lowest so far (or
    non-finite); None when the loss never moved the wrong way.

    Example:
        >>> moved_step([3.0] * 30 + [2.0] * 30 + [4.0] * 30, warmup=5, margin=0.25)
        61
    """
    low = math.inf
    for step in range(span - 1, len(losses)):
        window = losses[step - span + 1:step + 1]
        mean = sum(window) / span
        if step >= warmup and (not math.isfinite(mean) or mean > low + margin):
            return step
        if math.isfinite(mean):
            low = min(low, mean)
    return None


def run(size: str, lr: float, seed: int, data, args) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from tick_lightning import TickCallback
    from tick_lightning.reporting import find_anomalies, load_run

    class LossLog(Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    train, val_batches, vocab = data
    spec = SIZES[size]
    model = build_lm("none", vocab, spec["hidden"], spec["layers"], spec["heads"], args.seq, seed)
    init = eval_loss(model, val_batches)
    module = lm_module(model, lr, args.steps, args.warmup, 0.0)
    dirpath = tempfile.mkdtemp(prefix="early_warning_")
    log = LossLog()
    tick = TickCallback(ticks=f"every:{args.tick_every}", states=["loss"], dirpath=dirpath, log_to_loggers=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[log, tick],
                        gradient_clip_val=args.grad_clip if args.grad_clip > 0 else None, default_root_dir=dirpath,
                        num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(Windows(train, args.steps * args.batch, args.seq, seed), batch_size=args.batch)
    torch.manual_seed(seed)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    final = eval_loss(model, val_batches)
    found = find_anomalies(load_run(dirpath))
    warns = sorted((f for f in found if f.kind in WARNINGS), key=lambda f: f.step)
    moved = moved_step(log.losses, 0, args.moved)
    warn = warns[0].step if warns else None
    row = dict(size=size, lr=lr, seed=seed, init_loss=init, final_loss=final, diverged=diverged(final, init),
               moved_step=moved, warn_step=warn, warn_kind=warns[0].kind if warns else None,
               lead=moved - warn if moved is not None and warn is not None else None,
               warnings=len(warns), warned=[(f.step, f.kind, f.layer) for f in warns[:5]],
               other_findings=sorted({f.kind for f in found} - set(WARNINGS)), seconds=round(seconds, 2),
               grad_clip=float(args.grad_clip))
    shutil.rmtree(dirpath, ignore_errors=True)
    return row


def summarize(rows: list[dict], near: float = 0.5) -> list[dict]:
    """Per size: the runs whose loss moved (warned first / at all, the leads), the runs that ended degraded
    (non-finite or ``near`` nats above the best final loss of their size and seed: a learning rate too high that
    never made the loss rise) and whether they were warned, and the calm runs (neither) with their warnings."""
    out = []
    for size in sorted({r["size"] for r in rows}):
        rs = [r for r in rows if r["size"] == size]
        best = {seed: min(r["final_loss"] for r in rs if r["seed"] == seed and math.isfinite(r["final_loss"]))
                for seed in {r["seed"] for r in rs}}
        for r in rs:
            r["degraded"] = not math.isfinite(r["final_loss"]) or r["final_loss"] > best[r["seed"]] + near
        moved = [r for r in rs if r["moved_step"] is not None]
        degraded = [r for r in rs if r["moved_step"] is None and r["degraded"]]
        calm = [r for r in rs if r["moved_step"] is None and not r["degraded"]]
        first = [r for r in moved if r["lead"] is not None and r["lead"] > 0]
        leads = [r["lead"] for r in moved if r["lead"] is not None]
        out.append(dict(size=size, runs=len(rs), moved=len(moved), warned_first=len(first),
                        warned_at_all=sum(r["warn_step"] is not None for r in moved),
                        lead_median=statistics.median(leads) if leads else None, leads=sorted(leads),
                        degraded=len(degraded), degraded_warned=sum(r["warnings"] > 0 for r in degraded),
                        calm=len(calm), calm_warned=sum(r["warnings"] > 0 for r in calm),
                        calm_warnings=sum(r["warnings"] for r in calm)))
    return out


def print_summary(rows: list[dict], near: float = 0.5) -> None:
    print(f"\n{'size':7s} {'runs':>4s} {'loss moved':>10s} {'warned first':>12s} {'warned':>6s} {'lead median':>11s}"
          f" {'degraded':>8s} {'warned':>6s} {'calm':>4s} {'calm warned':>11s} {'warnings':>8s}")
    for s in summarize(rows, near):
        lead = f"{s['lead_median']:g}" if s["lead_median"] is not None else "-"
        print(f"{s['size']:7s} {s['runs']:4d} {s['moved']:10d} {s['warned_first']:12d} {s['warned_at_all']:6d} "
              f"{lead:>11s} {s['degraded']:8d} {s['degraded_warned']:6d} {s['calm']:4d} {s['calm_warned']:11d} "
              f"{s['calm_warnings']:8d}   leads {s['leads']}")


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--text", default="../shared/data/text/tinyshakespeare.txt")
    a.add_argument("--sizes", nargs="+", default=["h64l2", "h128l2"], choices=list(SIZES))
    a.add_argument("--lrs", nargs="+", type=float, default=LRS)
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    a.add_argument("--steps", type=int, default=200)
    a.add_argument("--warmup", type=int, default=20)
    a.add_argument("--seq", type=int, default=64)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--val-batches", type=int, default=8)
    a.add_argument("--tick-every", type=int, default=50)
    a.add_argument("--grad-clip", type=float, default=0.0, help="Lightning's gradient_clip_val (0: none)")
    a.add_argument("--moved", type=float, default=0.25, help="nats above its lowest 10-step mean: the loss moved")
    a.add_argument("--near", type=float, default=0.5,
                   help="nats above the best final loss of its size and seed: a run that never moved ended degraded")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--out", default=str(Path(__file__).parent / "results" / "early_warning_runs.jsonl"))
    a.add_argument("--summarize", action="store_true", help="only print the table of the runs in --out")
    args = a.parse_args(argv)
    if args.summarize:
        print_summary([json.loads(line) for line in Path(args.out).read_text().splitlines()], args.near)
        return
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers' level when imported: import it first)

    for name in ("lightning.pytorch", "lightning.fabric", "tick_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    train, val, vocab = char_data(args.text)
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(val) - args.seq - 1, (args.val_batches * args.batch,), generator=g)
    val_batches = torch.stack([val[s: s + args.seq + 1] for s in starts.tolist()]).view(args.val_batches, args.batch, -1)
    rows = []
    t0 = time.time()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for seed in args.seeds:
            for size in args.sizes:
                for lr in args.lrs:
                    r = run(size, lr, seed, (train, val_batches, vocab), args)
                    rows.append(r)
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                    print(f"{size} lr {lr:<6g} seed {seed}: final {r['final_loss']:.3f}{' DIVERGED' if r['diverged'] else ''}"
                          f" moved {r['moved_step']} warned {r['warn_step']} lead {r['lead']} warnings "
                          f"{r['warnings']} {r['warned'][:2]} ({r['seconds']:.0f} s)", flush=True)
    print_summary(rows, args.near)
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {round(time.time() - t0)} s; "
          f"runs: {args.out}")


if __name__ == "__main__":
    main()
