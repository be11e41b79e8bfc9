"""Run by tests/test_distributed.py: a 2-process CPU DDP fit (gloo) with two TickCallbacks."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
import tiny  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from recipes._shared.sharding import end_process_group  # noqa: E402
from tick_lightning import TickCallback  # noqa: E402


class Expect(Callback):
    """Independent per-rank record of weight norms before each update and of each rank's loss."""

    def __init__(self, out):
        self.out, self.rows = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = pl_module.model.classifier.weight.detach().double()
        g = pl_module.model.classifier.weight.grad.detach().double()
        self.rows.append({"step": trainer.global_step, "wnorm": float(w.norm()), "gnorm": float(g.norm())})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[-1]["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module):
        Path(self.out, f"expect-rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


def main(out: str) -> None:
    L.seed_everything(0)
    all_ranks = TickCallback(ticks="0,2,every:3", ranks="all", dirpath=f"{out}/all")
    zero = TickCallback(ticks="every:2", ranks="zero", dirpath=f"{out}/zero")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=7, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[all_ranks, zero, Expect(out)])
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(128), 4, shuffle=True))


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # as torch asks at the end of a distributed script (pytorch/pytorch#190489)
