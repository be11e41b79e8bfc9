"""One fit of a tiny GPT-2 with ticks and step checkpoints, that can die on purpose (tests/test_records_integrity.py).

    python tests/crash_script.py OUT [--max-steps 30] [--every 5] [--ckpt-every 10] [--resume CKPT]
        [--exit-at STEP]          os._exit(137) inside training_step at that global step (kill -9 alike)
        [--exit-in-write N]       os._exit(137) while writing the N-th part (its temporary file half made)
        [--slow-writer SECONDS]   each part takes this long to write (a slow disk)
        [--step-sleep SECONDS]    each training step takes at least this long (room for a random SIGKILL)
        [--dense]                 also record the dense per-step series (off here: the tick tests count ticks)
        [--guard MODE]            a Guard of that mode whose thresholds make it act on most steps (with --dense)
        [--wait-for PATH]         at step 5, wait (up to 120 s) until PATH exists: a fit that stays alive
        [--signal PATH]           at step 1 (after fit start), create PATH

Records go to OUT/ticks, checkpoints to OUT/ckpt/step=N.ckpt. Prints "train-start" when training starts
and "done" when the fit ends; appends the seconds each checkpoint waited for the writer to OUT/flush.txt.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import tiny  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from tick_lightning import Guard, TickCallback  # noqa: E402
from tick_lightning.store import Recorder  # noqa: E402
from tick_lightning.store import writer as writer_module  # noqa: E402


class Dying(tiny.HFClassifier):
    def __init__(self, model, exit_at: int, step_sleep: float, wait_for: str = "", signal: str = ""):
        super().__init__(model)
        self.exit_at, self.step_sleep, self.wait_for, self.signal = exit_at, step_sleep, wait_for, signal

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.exit_at:
            os._exit(137)
        if self.signal and self.trainer.global_step == 1:
            Path(self.signal).touch()
        if self.wait_for and self.trainer.global_step == 5:
            deadline = time.monotonic() + 120
            while not Path(self.wait_for).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(self.step_sleep)
        return super().training_step(batch, batch_idx)


class Announce(L.Callback):
    """Says when training starts, so a test can aim a SIGKILL into the training steps."""

    def on_train_start(self, trainer, pl_module):
        print("train-start", flush=True)


def patch_writer(slow: float, exit_in_write: int) -> None:
    real, count = writer_module.write_atomic, [0]

    def write_atomic(table, path):
        time.sleep(slow)
        if count[0] == exit_in_write and path.name.startswith("part-"):
            import pyarrow.parquet as pq

            pq.write_table(table.slice(0, table.num_rows // 2), path.with_name(path.name + ".tmp"))
            os._exit(137)
        count[0] += 1
        real(table, path)

    writer_module.write_atomic = write_atomic


def time_flushes(out: Path) -> None:
    real = Recorder.flush

    def flush(self):
        t = time.perf_counter()
        real(self)
        with open(out / "flush.txt", "a") as handle:
            handle.write(f"{time.perf_counter() - t:.6f}\n")

    Recorder.flush = flush


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--resume")
    ap.add_argument("--exit-at", type=int, default=-1)
    ap.add_argument("--exit-in-write", type=int, default=-1)
    ap.add_argument("--slow-writer", type=float, default=0.0)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--guard", choices=["clip", "zclip", "skip"])
    ap.add_argument("--wait-for", default="")
    ap.add_argument("--signal", default="")
    args = ap.parse_args()
    patch_writer(args.slow_writer, args.exit_in_write)
    L.seed_everything(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    time_flushes(out)
    guard = {"clip": Guard("clip", warmup=4, z=0.5), "zclip": Guard("zclip", warmup=4, z=0.5),
             "skip": Guard("skip", warmup=4, window=8, z=1.0)}.get(args.guard)
    ticks = TickCallback(ticks=f"every:{args.every}", states=["loss", "lr", "weight", "grad"], dirpath=out / "ticks",
                         dense=args.dense or guard is not None, guard=guard)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=args.ckpt_every, save_top_k=-1)
    trainer = tiny.trainer(out, callbacks=[ticks, ckpt, Announce()], max_steps=args.max_steps, enable_checkpointing=True)
    model = Dying(tiny.tiny_gpt2(), args.exit_at, args.step_sleep, args.wait_for, args.signal)
    trainer.fit(model, tiny.loader(tiny.token_dataset(64)), ckpt_path=args.resume)
    print("done", flush=True)


if __name__ == "__main__":
    main()
