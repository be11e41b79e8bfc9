"""An ordinary Lightning training script that knows nothing of tick-lightning (run by tests/test_plugin.py).

Whatever tick-lightning does here comes from the environment, through the entry point Lightning calls at
``Trainer(...)``. The only tick-lightning import is behind ``--own-callback``, which stands for a script that
already adds its own ``TickCallback``.

    python plugin_script.py OUT [--ddp] [--fits N] [--own-callback DIR] [--max-steps N] [--package NAME]
                                [--checkpoint]
    python plugin_script.py --scenarios JSON [--package NAME]

``--scenarios`` runs several such scripts one after another in this one process (the start-up is paid once):
JSON maps a name to ``{"args": [OUT, ...], "env": {VARIABLE: VALUE}}``; each runs with the tick-lightning
variables of the environment replaced by its ``env`` (the entry point reads them at every ``Trainer(...)``),
prints ``SCENARIO name`` to stderr first and tags its ``RESULT`` lines with ``"scenario": name``.

``--package pytorch_lightning`` makes it a script of the standalone package (``import pytorch_lightning as L``).
Prints one ``RESULT {json}`` line per fit (rank 0): the Trainer's callbacks (and whether each is a Callback of
the script's package), log_dir, precision plugin, the class of the model's LayerNorm and, with
``--checkpoint``, the path of the checkpoint the Trainer's ModelCheckpoint wrote.
"""

import argparse
import importlib
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _package() -> str:
    return sys.argv[sys.argv.index("--package") + 1] if "--package" in sys.argv else "lightning"


L = importlib.import_module(_package())


class SmallNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=4)


def main(argv=None, scenario=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--fits", type=int, default=1)
    parser.add_argument("--own-callback", default=None)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--package", default="lightning", choices=["lightning", "pytorch_lightning"])
    parser.add_argument("--checkpoint", action="store_true")
    args = parser.parse_args(argv)

    trainers = []  # kept alive, so that no two fits' callbacks can share an id()
    for _ in range(args.fits):
        L.seed_everything(0)
        callbacks = []
        if args.own_callback:
            if args.package == "pytorch_lightning":
                from tick_lightning.for_pytorch_lightning import TickCallback
            else:
                from tick_lightning import TickCallback

            callbacks.append(TickCallback(dirpath=args.own_callback))
        ddp = dict(strategy="ddp", devices=2) if args.ddp else dict(devices=1)
        trainer = L.Trainer(accelerator="cpu", default_root_dir=args.out, max_steps=args.max_steps,
                            callbacks=callbacks, enable_checkpointing=args.checkpoint, enable_progress_bar=False,
                            enable_model_summary=False, **ddp)
        model = SmallNet()
        trainer.fit(model, data())
        trainers.append(trainer)
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.global_rank == 0:
            print("RESULT " + json.dumps({
                "scenario": scenario,
                "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
                "callback_ids": [id(cb) for cb in trainer.callbacks],
                "package_callbacks": [isinstance(cb, L.Callback) for cb in trainer.callbacks],
                "checkpoint": trainer.checkpoint_callback.best_model_path if args.checkpoint else None,
                "log_dir": log_dir,
                "precision_plugin": type(trainer.precision_plugin).__name__,
                "norm_class": f"{type(model.net[1]).__module__}.{type(model.net[1]).__name__}",
            }), flush=True)


def run_scenarios(scenarios: dict, package: str) -> None:
    variables = ("TICK_LIGHTNING", "TICK_LIGHTNING_DIR", "TICK_LIGHTNING_CONFIG", "TICK_LIGHTNING_PATCH_NORMS")
    base = {k: v for k, v in os.environ.items() if k not in variables}
    for name, scenario in scenarios.items():
        os.environ.clear()
        os.environ.update(base, **scenario["env"])
        print(f"SCENARIO {name}", file=sys.stderr, flush=True)
        main([*scenario["args"], "--package", package], scenario=name)


if __name__ == "__main__":
    if "--scenarios" in sys.argv:
        run_scenarios(json.loads(sys.argv[sys.argv.index("--scenarios") + 1]), _package())
    else:
        main()
    # as torch asks at the end of a distributed script (Lightning does it at exit under nccl only; a gloo group
    # left to the interpreter's shutdown can abort the exit: pytorch/pytorch#190489)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
