"""FSDP2 on 2 CPU processes (gloo): Lightning's ModelParallelStrategy, ``fully_shard`` per GPT-2 block in
``configure_model``, re-normalization after every step. Run by tests/test_renorm_resolve.py:

    python tests/renorm_fsdp2_script.py OUT_DIR MODE[,MODE...]     (MODE: renorm_callback or tick_callback)

One fit per MODE, in order, inside the processes of one launch (the start-up is paid once), into ``OUT_DIR/MODE``.
Each rank writes ``planned-rank{R}.json`` at the first batch and ``OUT_DIR/rank{R}.json`` at the end: whether every planned tensor was the module's live parameter
(by name, ``is``) at the first batch, whether those were DTensors, and the row norms of the re-normalized
weights after training (from ``full_tensor()``).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from recipes._shared.sharding import end_process_group  # noqa: E402
from tick_lightning import Renorm, RenormCallback, TickCallback  # noqa: E402
from tick_lightning.dist import is_sharded  # noqa: E402

TARGET = "model.transformer.h.*.attn.c_attn.weight"


class CheckLive(L.Callback):
    """After the renorm callback: at the first batch, compare the engine's plans with the live parameters."""

    def __init__(self, engine, out):
        self.engine, self.out, self.result = engine, Path(out), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.result is None:
            live = dict(pl_module.named_parameters())
            planned = self.engine.planned()
            self.result = {"planned": [n for n, _ in planned],
                           "live": all(live.get(n) is t for n, t in planned),
                           "sharded": all(is_sharded(t) for _, t in planned)}
            # written now too: a later failure must not hide what was planned
            (self.out / f"planned-rank{trainer.global_rank}.json").write_text(json.dumps(self.result))


def main(out: str, mode: str) -> None:
    spec = Renorm(TARGET, method="unit", at="step")
    if mode == "renorm_callback":
        renorm = RenormCallback([spec], ticks="every:2", dirpath=Path(out) / "ticks")
        engine = renorm.engine
    else:
        renorm = TickCallback(ticks="every:2", states=["loss"], renorm=[spec], dirpath=Path(out) / "ticks",
                              log_to_loggers=False)
        engine = renorm._renorm
    check = CheckLive(engine, out)
    model = tiny.ShardedGPT2Classifier(tiny.tiny_gpt2())
    trainer = tiny.trainer(out, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                           devices=2, callbacks=[renorm, check], max_steps=3)
    trainer.fit(model, tiny.loader(tiny.token_dataset(48), batch_size=4))
    norms = {n: p.full_tensor().norm(dim=-1).tolist() for n, p in model.named_parameters() if n.endswith("c_attn.weight")}
    result = dict(check.result or {}, applications=engine.applications, row_norms=norms)
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    for fit_mode in sys.argv[2].split(","):
        Path(sys.argv[1], fit_mode).mkdir(parents=True, exist_ok=True)
        main(str(Path(sys.argv[1], fit_mode)), fit_mode)
    end_process_group()  # as torch asks at the end of a distributed script (pytorch/pytorch#190489)
