"""One ``transformers.Trainer`` fit with ``TickTrainerCallback`` in one process or under ``accelerate launch`` with
several CPU processes (DDP over gloo); the global batch is 8 either way (tests/test_hf_trainer.py).

    python tests/hf_ddp_script.py OUT
    accelerate launch --cpu --num_processes 2 --num_machines 1 tests/hf_ddp_script.py OUT

Records go to OUT/ticks (every rank's with ``ranks="all"``).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
import torch  # noqa: E402

from tick_lightning.hf import TickTrainerCallback  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = tiny.hf_args(out, max_steps=6, per_device_train_batch_size=8 // world, gradient_accumulation_steps=2,
                        max_grad_norm=0.05, ddp_backend="gloo" if world > 1 else None)
    tick = TickTrainerCallback(ticks="every:2", states=["loss", "grad", "weight", "update"], dirpath=out / "ticks",
                               ranks="all", log_to_loggers=False)
    trainer = tiny.hf_trainer(model=tiny.tiny_bert(), args=args, callbacks=[tick],
                              train_dataset=tiny.TokenDicts(tiny.token_dataset(8 * 2 * 6)))
    trainer.train()
    print("done", world, flush=True)


if __name__ == "__main__":
    main()
