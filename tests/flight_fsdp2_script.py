"""FSDP2 on 2 CPU processes (gloo): the flight recorder's layer watch under sharding. Run by tests/test_flight.py:

    python tests/flight_fsdp2_script.py OUT_DIR

Lightning's ModelParallelStrategy, ``fully_shard`` per GPT-2 block and on the root; every rank records
(``ranks="all"``) into ``OUT_DIR/ticks``. At step ``FAULT_STEP`` the gradient of ``QUIET`` (a LayerNorm weight,
~2e-3 of the global norm, sharded over the two ranks) is x1e3 on every rank's shard: a jump of its own series
that the global norm does not show (about x2 there). (x100 was borderline: with 13 steps of history and the
jump's own return in the same flush, its robust z was 5.5-9.5 from one unseeded run to the next.) Each rank's
watch sees the reduced norms, so both find the same event and
dump the same steps, with no agreement collective. At step ``INPUT_STEP`` the input of ``NORM`` is x1e4 on rank 1
only (``flight=["input_absmax"]``: each rank's own batches, never gathered): rank 1's watch finds it, and the
flush's one agreement makes rank 0 dump with it. The update norms (reduced over the shards, watched for jumps)
and the attention-logit scale (each rank's own batches) are recorded too: neither may add an event here.
"""

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from recipes._shared.sharding import end_process_group  # noqa: E402
from tick_lightning import TickCallback  # noqa: E402

QUIET = "model.transformer.h.0.ln_1.weight"
FAULT_STEP = 14
NORM = "model.transformer.h.1.ln_2"
INPUT_STEP = 9  # in a flush (steps 6-11) before the fault's: only rank 1 finds an event there


class Fault(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == FAULT_STEP:
            dict(pl_module.named_parameters())[QUIET].grad.mul_(1e3)  # every rank's shard: the whole gradient


class InputFault(L.Callback):
    """Rank 1's input of ``NORM`` x1e4 at ``INPUT_STEP`` (a pre-hook ahead of the recorder's observer)."""

    handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == INPUT_STEP and trainer.global_rank == 1:
            self.handle = dict(pl_module.named_modules())[NORM].register_forward_pre_hook(
                lambda m, args: (args[0] * 1e4, *args[1:]), prepend=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def main(out: str) -> None:
    L.seed_everything(0, workers=True, verbose=False)
    ticks = TickCallback(ticks="0", states=["loss"], ranks="all", flight_window=12, flight=["input_absmax", "update_norm", "attn_logit"],
                         dirpath=Path(out) / "ticks", log_to_loggers=False)
    trainer = tiny.trainer(out, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                           devices=2, callbacks=[Fault(), InputFault(), ticks], max_steps=24)
    trainer.fit(tiny.ShardedGPT2Classifier(tiny.tiny_gpt2()), tiny.loader(tiny.token_dataset(96), batch_size=4))


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()  # as torch asks at the end of a distributed script (pytorch/pytorch#190489)
