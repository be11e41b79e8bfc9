"""What ``TickTrainerCallback`` costs a Hugging Face ``Trainer`` step, beside the same Trainer without it and beside
the Trainer's own per-step logging (``logging_steps=1``: its loss and ``grad_norm`` every step), in one process,
interleaved rounds.

Variants (each a fresh ``Trainer`` on the same model initialisation and batches):

  plain     no callback, no logging (``logging_strategy="no"``)
  tick      ``TickTrainerCallback()`` with its defaults (ticks every 100 steps, the dense series and the flight
            recorder with its hooked series)
  log1      no callback, ``logging_steps=1`` (the Trainer's own every-step loss and global grad norm: a host read of
            each, every step)

Model: BERT from its config (``--hidden`` x ``--layers``, no download), sequence classification on random tokens,
batch ``--batch`` x ``--seq``, AdamW, ``--steps`` optimizer steps of which the first ``--warmup`` are not timed.
Per run: wall time and process CPU time per timed step (a callback reads the clocks at ``on_step_end``). Prints the
medians over rounds and each variant's ratio to ``plain``.

    OMP_NUM_THREADS=1 python benchmarks/hf_trainer_overhead.py --rounds 4
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tick_lightning.hf import TickTrainerCallback  # noqa: E402

VARIANTS = ("plain", "tick", "log1")


class Tokens(Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Clock(TrainerCallback):
    """Wall and CPU clocks at the end of each optimizer step; the timed steps are those after ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.marks = warmup, []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time()))

    def per_step(self) -> tuple[float, float]:
        (w0, c0), (w1, c1) = self.marks[self.warmup - 1], self.marks[-1]
        n = len(self.marks) - self.warmup
        return (w1 - w0) / n, (c1 - c0) / n


def run(variant: str, args, data, state: dict) -> tuple[float, float]:
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq, num_labels=2))
    model.load_state_dict(state)
    out = tempfile.mkdtemp(prefix=f"hf-overhead-{variant}-")
    targs = transformers.TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        logging_strategy="steps" if variant == "log1" else "no", logging_steps=1, seed=0)
    clock = Clock(args.warmup)
    callbacks = [clock] + ([TickTrainerCallback(log_to_loggers=False)] if variant == "tick" else [])
    transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks).train()
    return clock.per_step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    state = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq, num_labels=2)).state_dict()
    data = Tokens(args.batch * args.steps, args.seq, args.vocab)
    wall: dict = {v: [] for v in variants}
    cpu: dict = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no variant always first
        for v in order:
            w, c = run(v, args, data, state)
            wall[v].append(w)
            cpu[v].append(c)
            print(f"round {r} {v:6s} {1e3 * w:8.2f} ms/step wall  {1e3 * c:8.2f} ms/step cpu", flush=True)
    print(f"\n{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, transformers "
          f"{transformers.__version__}; BERT {args.hidden} x {args.layers}, batch {args.batch} x {args.seq}, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.rounds} interleaved rounds")
    base = "plain" if "plain" in wall else variants[0]
    base_w, base_c = statistics.median(wall[base]), statistics.median(cpu[base])
    print(f"{'variant':8s} {'wall ms/step':>12s} {'ratio':>6s} {'cpu ms/step':>12s} {'ratio':>6s}  per-round wall ms")
    for v in variants:
        w, c = statistics.median(wall[v]), statistics.median(cpu[v])
        rounds = " ".join(f"{1e3 * x:.1f}" for x in wall[v])
        print(f"{v:8s} {1e3 * w:12.2f} {w / base_w:6.3f} {1e3 * c:12.2f} {c / base_c:6.3f}  {rounds}")


if __name__ == "__main__":
    main()
