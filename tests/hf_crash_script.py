"""One ``transformers.Trainer`` fit of a tiny BERT with ``TickTrainerCallback``, checkpoints every 8 steps, that can
die on purpose (tests/test_hf_trainer.py).

    python tests/hf_crash_script.py OUT [--max-steps 24] [--exit-at STEP] [--resume]

``--exit-at``: ``os._exit(137)`` (as kill -9) when the Trainer begins that optimizer step, after a short sleep that
lets the record writer's thread catch up on some writes (not all); ``--resume``: ``train(resume_from_checkpoint=True)``
(its last checkpoint). Records go to OUT/ticks, checkpoints to OUT/checkpoint-N.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tick_lightning.hf import TickTrainerCallback  # noqa: E402


class Dying(TrainerCallback):
    def __init__(self, exit_at: int):
        self.exit_at = exit_at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.exit_at:
            time.sleep(0.2)
            os._exit(137)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--exit-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    a = parser.parse_args()
    out = Path(a.out)
    args = tiny.hf_args(out, max_steps=a.max_steps, per_device_train_batch_size=4, save_strategy="steps", save_steps=8)
    tick = TickTrainerCallback(ticks="every:4", states=["loss", "grad", "weight", "update"], dirpath=out / "ticks",
                               log_to_loggers=False)
    trainer = tiny.hf_trainer(model=tiny.tiny_bert(), args=args, callbacks=[tick, Dying(a.exit_at)],
                              train_dataset=tiny.TokenDicts(tiny.token_dataset(4 * a.max_steps)))
    trainer.train(resume_from_checkpoint=True if a.resume else None)


if __name__ == "__main__":
    main()
