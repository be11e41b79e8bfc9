"""SASRec reproduction on Amazon Video Games ("Games") with the GPT-2 backbone, and variants side by side.

Trains ``recipes.sequential_recommendation.SequentialRecommender`` with a plain Lightning Trainer (no run
directory, no ticks unless a variant asks for them) at the SASRec reference hyper-parameters (max_len 50,
hidden 50, 2 blocks, 1 head, dropout 0.5, Adam 1e-3 betas (0.9, 0.98), batch 128, BCE with one sampled
negative per position) and evaluates validation and test every ``--eval-every`` epochs with both protocols
(100 sampled negatives; full ranking with seen items masked). Variants, run one after the other on the
same data in one process, with time-per-epoch ratios against the first:

- ``plain``: the model as built.
- ``patch``: every normalization layer patched with ``tick_lightning.norms.patch_norms`` (fused kernels,
  fp32 statistics).
- ``renorm``: ``TickCallback`` with ``Renorm("model.item_emb.weight", method="unit", at="step")``: item
  embedding rows re-normalized to unit L2 norm after every optimizer step (ticks every 200 steps).

Published (100 negatives, test): SASRec paper HR@10 0.7410 / NDCG@10 0.5360; SASRec.pytorch original
0.7318 / 0.5308, Pre-LN 0.7442 / 0.5376, Post-LN 0.7350 / 0.5297. Every evaluation reports the recipe's
protocol (every user, fixed seeded negatives that exclude all of the user's items) and, beside it,
SASRec.pytorch's own (``SASRecPytorchProtocol``: 10,000 random users with >= 4 interactions, fresh negatives,
and the best test value seen so far, which is what its ``main.py`` keeps).

Usage::

    python benchmarks/sasrec_games.py --data ../shared/data/recsys/video_games.txt --epochs 200 --eval-every 20
    python benchmarks/sasrec_games.py --epochs 3 --eval-every 3 --variants plain patch renorm   # short compare
    python benchmarks/sasrec_games.py --device cuda --precision bf16-mixed --epochs 200          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.sequential_recommendation import SequentialRecommendationData, SequentialRecommender

PUBLISHED = {
    "SASRec paper": (0.7410, 0.5360),
    "SASRec.pytorch original": (0.7318, 0.5308),
    "SASRec.pytorch Pre-LN": (0.7442, 0.5376),
    "SASRec.pytorch Post-LN": (0.7350, 0.5297),
}


def peak_memory_bytes(device: str) -> int:
    """Peak device memory (CUDA) or the process's peak resident set size (CPU; monotone over the process)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class SASRecPytorchProtocol:
    """SASRec.pytorch's own evaluation (``utils.evaluate`` / ``evaluate_valid``), to compare on its terms.

    The published numbers come from this protocol, which differs from the recipe's in four ways:

    - only users with >= 4 interactions are evaluated (its ``data_partition`` gives shorter users no
      validation or test item);
    - test: a fresh random sample of 10,000 user ids at every evaluation; validation: user ids 1-9,999;
    - 100 negatives drawn afresh at every evaluation, uniformly and *with* repeats, among items the history
      does not contain (test: train + validation items; validation: train items);
    - ``main.py`` keeps the best test HR@10 and NDCG@10 seen over all its evaluations (``best_test_hr =
      max(...)``), each a noisy sample.

    ``evaluate`` returns ``{"ref_val/hr@k", "ref_val/ndcg@k", "ref_test/hr@k", "ref_test/ndcg@k", ...}``;
    the running maxima are added by the caller. Ties (a negative equal to the target) go to the target.
    """

    def __init__(self, dm: SequentialRecommendationData, k: int = 10, seed: int = 0, sample: int = 10_000,
                 negatives: int = 100):
        self.dm, self.k, self.sample, self.negatives = dm, k, sample, negatives
        self.rng = np.random.default_rng(seed)
        data, split = dm.interactions, dm.split
        self.ids = np.array([int(u) for u in data.users])
        self.eligible = np.array([len(s) >= 4 for s in data.sequences])
        self.train, self.valid, self.test = split.train, split.valid, split.test

    def _draw(self, exclude: np.ndarray) -> np.ndarray:
        neg = self.rng.integers(1, self.dm.num_items + 1, self.negatives)
        while (bad := np.isin(neg, exclude)).any():
            neg[bad] = self.rng.integers(1, self.dm.num_items + 1, int(bad.sum()))
        return neg

    @torch.no_grad()
    def _split(self, module, users: np.ndarray, test: bool) -> dict[str, float]:
        from recipes.recsys.data import _left_pad
        from recipes.recsys.metrics import rank_metrics

        users = users[self.eligible[users]]
        hist = [np.append(self.train[u], self.valid[u]) if test else self.train[u] for u in users]
        targets = (self.test if test else self.valid)[users]
        sums, device = {}, module.device
        for lo in range(0, len(users), 1024):
            seq = torch.from_numpy(np.stack([_left_pad(h, self.dm.max_len) for h in hist[lo:lo + 1024]])).to(device)
            cand = np.stack([np.r_[t, self._draw(h)] for t, h in zip(targets[lo:lo + 1024], hist[lo:lo + 1024])])
            scores = module.model.scores(seq).float().gather(1, torch.from_numpy(cand).to(device))
            rank = (scores[:, 1:] > scores[:, :1]).sum(1)
            for name, v in rank_metrics(rank, (self.k,)).items():
                sums[name] = sums.get(name, 0.0) + float(v.double().sum())
        prefix = "ref_test" if test else "ref_val"
        out = {f"{prefix}/{name}": v / len(users) for name, v in sums.items()}
        out[f"{prefix}/users"] = int(len(users))
        return out

    def evaluate(self, module) -> dict[str, float]:
        n = len(self.ids)
        test_users = self.rng.choice(n, min(self.sample, n), replace=False)
        val_users = np.flatnonzero(self.ids < self.sample)
        return {**self._split(module, val_users, test=False), **self._split(module, test_users, test=True)}


class EvalEvery(L.Callback):
    """Evaluate validation and test (both protocols) every ``every`` epochs and at the end; time the epochs."""

    def __init__(self, dm: SequentialRecommendationData, every: int, log: list, variant: str, out: Path | None,
                 k: int = 10):
        self.dm, self.every, self.rows, self.variant, self.out, self.k = dm, every, log, variant, out, k
        self.train_seconds: list[float] = []
        self.reference = SASRecPytorchProtocol(dm, k=k)
        self.best: dict[str, float] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.train_seconds.append(time.perf_counter() - self.t0)
        epoch = trainer.current_epoch + 1
        loss = trainer.callback_metrics.get("train/loss")
        print(f"{self.variant} epoch {epoch}: {self.train_seconds[-1]:.1f}s, last loss "
              f"{float(loss) if loss is not None else float('nan'):.4f}", flush=True)
        if epoch % self.every == 0 or epoch == trainer.max_epochs:
            self.evaluate(trainer, pl_module, epoch)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module, epoch: int) -> dict:
        was_training = pl_module.training
        pl_module.eval()
        t0 = time.perf_counter()
        row = {"variant": self.variant, "epoch": epoch, "step": int(trainer.global_step),
               "train_seconds_per_epoch": sum(self.train_seconds) / len(self.train_seconds)}
        for split, loader in (("val", self.dm.val_dataloader()), ("test", self.dm.test_dataloader())):
            sums: dict[str, float] = {}
            n = 0
            for batch in loader:
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                with trainer.precision_plugin.forward_context():
                    metrics = pl_module.evaluate(batch)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v.double().sum())
                n += len(batch["target"])
            row.update({f"{split}/{k}": v / n for k, v in sums.items()})
        with trainer.precision_plugin.forward_context():
            row.update(self.reference.evaluate(pl_module))
        for name in (f"ref_test/hr@{self.k}", f"ref_test/ndcg@{self.k}"):  # what SASRec.pytorch's main.py keeps
            self.best[name] = max(self.best.get(name, 0.0), row[name])
            row[name.replace("ref_test/", "ref_test/best_")] = self.best[name]
        row["eval_seconds"] = time.perf_counter() - t0
        row["peak_memory_bytes"] = peak_memory_bytes(str(pl_module.device))
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        pl_module.train(was_training)
        return row


def run_variant(variant: str, dm: SequentialRecommendationData, args, log: list) -> dict:
    L.seed_everything(args.seed, verbose=False)
    dm.train_set.rng = np.random.default_rng(args.seed)  # every variant sees the same training negatives
    module = SequentialRecommender(backbone=args.backbone, hidden_size=args.hidden, num_layers=args.layers,
                                   num_heads=args.heads, dropout=args.dropout, max_len=args.max_len, loss=args.loss,
                                   lr=args.lr, betas=(0.9, 0.98), lr_schedule=args.lr_schedule, ks=[args.k],
                                   init=args.init, num_negatives=args.num_negatives,
                                   weight_decay=args.weight_decay)
    module.build(dm)
    callbacks: list = [EvalEvery(dm, args.eval_every, log, variant, args.out, k=args.k)]
    if variant == "patch":
        from tick_lightning.norms import patch_norms

        report = patch_norms(module)
        print(f"patched {len(report.patched)} normalization layers", flush=True)
    elif variant == "renorm":
        from tick_lightning.callback import TickCallback
        from tick_lightning.renorm.spec import Renorm

        callbacks.append(TickCallback(ticks="every:200", states=["loss", "grad"], dirpath=str(args.tick_dir / variant),
                                      renorm=[Renorm("model.item_emb.weight", method="unit", at="step")],
                                      log_to_loggers=False))
    elif variant != "plain":
        raise SystemExit(f"unknown variant {variant!r}; choose from plain, patch, renorm")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                        precision=args.precision, max_epochs=args.epochs, max_time=args.max_time,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    cb = callbacks[0]
    done = trainer.current_epoch  # epochs completed (max_time may stop early)
    if not log or log[-1]["variant"] != variant or log[-1]["epoch"] != done:
        cb.evaluate(trainer, module, done)
    rows = [r for r in log if r["variant"] == variant]
    best = max(rows, key=lambda r: r[f"val/ndcg@{args.k}"])
    return {"variant": variant, "epochs": done, "train_seconds_per_epoch": sum(cb.train_seconds) / len(cb.train_seconds),
            "last": rows[-1], "best_val": best}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/recsys/video_games.txt"))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--max-time", default=None, help="stop each variant after DD:HH:MM:SS (Lightning max_time)")
    p.add_argument("--variants", nargs="+", default=["plain"], choices=["plain", "patch", "renorm"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, 16-mixed")
    p.add_argument("--backbone", default="gpt2", choices=["gpt2", "bert"])
    p.add_argument("--loss", default="bce", choices=["bce", "softmax", "sampled_softmax"])
    p.add_argument("--num-negatives", type=int, default=100,
                   help="sampled_softmax: uniform negatives shared by a batch")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant (SASRec) or cosine decay to 0 over --epochs")
    p.add_argument("--init", default="backbone", choices=["backbone", "xavier"],
                   help="backbone: GPT-2's normal(0.02); xavier: Xavier-normal weights as SASRec.pytorch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-users", type=int, default=None, help="evaluate a seeded sample (SASRec code: 10000)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per evaluation")
    p.add_argument("--tick-dir", type=Path, default=Path("runs/bench_sasrec_ticks"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dm = SequentialRecommendationData(path=args.data, max_len=args.max_len, batch_size=args.batch_size,
                                      eval_batch_size=256, eval_users=args.eval_users, seed=0)
    dm.setup("fit")
    print(f"data loaded in {time.perf_counter() - t0:.1f}s: {dm.interactions.num_users} users, {dm.num_items} items, "
          f"{dm.interactions.num_interactions} interactions; {len(dm.train_set)} training rows; "
          f"torch threads {torch.get_num_threads()}; device {args.device}; precision {args.precision}", flush=True)
    log: list = []
    results = [run_variant(v, dm, args, log) for v in args.variants]
    k = args.k
    print(f"\n| variant | epochs | s/epoch (train) | ratio | test HR@{k} | test NDCG@{k} | test full HR@{k} | "
          f"test full NDCG@{k} | best-val epoch: test HR@{k} / NDCG@{k} | SASRec.pytorch protocol: last / best "
          f"HR@{k}, NDCG@{k} | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = results[0]["train_seconds_per_epoch"]
    for r in results:
        last, best = r["last"], r["best_val"]
        print(f"| {r['variant']} | {r['epochs']} | {r['train_seconds_per_epoch']:.1f} | "
              f"{r['train_seconds_per_epoch'] / base:.2f} | {last[f'test/hr@{k}']:.4f} | {last[f'test/ndcg@{k}']:.4f} | "
              f"{last[f'test/full_hr@{k}']:.4f} | {last[f'test/full_ndcg@{k}']:.4f} | {best['epoch']}: "
              f"{best[f'test/hr@{k}']:.4f} / {best[f'test/ndcg@{k}']:.4f} | "
              f"{last[f'ref_test/hr@{k}']:.4f} / {last[f'ref_test/best_hr@{k}']:.4f}, "
              f"{last[f'ref_test/ndcg@{k}']:.4f} / {last[f'ref_test/best_ndcg@{k}']:.4f} | "
              f"{last['peak_memory_bytes'] / 2**20:.0f} MiB |")
    print("published (test, 100 negatives): " + "; ".join(f"{n} {h:.4f} / {g:.4f}" for n, (h, g) in PUBLISHED.items()))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
