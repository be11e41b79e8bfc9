"""FSDP2 on 2 CPU processes (gloo): the flight recorder's layer watch under sharding. Run by tests/test_flight.py:

    python tests/flight_fsdp2_script.py OUT_DIR

Lightning's ModelParallelStrategy, ``fully_shard`` per GPT-2 block and on the root; every rank records
(``ranks="all"``) into ``OUT_DIR/ticks``. At step ``FAULT_STEP`` the gradient of ``QUIET`` (a LayerNorm weight,
~2e-3 of the global norm, sharded over the two ranks) is x100 on every rank's shard: a jump of its own series
that the global norm does not show. Each rank's watch sees the reduced norms, so both find the same event and
dump the same steps, with no agreement collective.
"""

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from tick_lightning import TickCallback  # noqa: E402

QUIET = "model.transformer.h.0.ln_1.weight"
FAULT_STEP = 14


class Fault(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == FAULT_STEP:
            dict(pl_module.named_parameters())[QUIET].grad.mul_(100.0)  # every rank's shard: the whole gradient


def main(out: str) -> None:
    ticks = TickCallback(ticks="0", states=["loss"], ranks="all", flight_window=16, dirpath=Path(out) / "ticks",
                         log_to_loggers=False)
    trainer = tiny.trainer(out, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                           devices=2, callbacks=[Fault(), ticks], max_steps=24)
    trainer.fit(tiny.ShardedGPT2Classifier(tiny.tiny_gpt2()), tiny.loader(tiny.token_dataset(96), batch_size=4))


if __name__ == "__main__":
    main(sys.argv[1])
    tiny.end_process_group()
