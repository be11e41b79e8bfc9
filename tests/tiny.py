"""Tiny Hugging Face models and data built from configs (no download), shared by the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 64
SEQ = 12


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_bert(num_labels: int = 2, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**cfg))


def tiny_gpt2(num_labels: int = 2, **overrides):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=num_labels,
               pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(**cfg))


def tiny_vit(num_labels: int = 2, **overrides):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**cfg))


def token_dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    """Sequences whose label is whether token 1 occurs more often than token 2: learnable, deterministic."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    ids[:, 0] = torch.randint(1, 3, (n,), generator=g)
    labels = (ids[:, 0] == 1).long()
    return TensorDataset(ids, torch.ones_like(ids), labels)


def image_dataset(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) + labels.view(-1, 1, 1, 1).float()
    return TensorDataset(x, labels)


class HFClassifier(L.LightningModule):
    """Wraps any HF sequence/image classification model; batches are tuples from the datasets above."""

    def __init__(self, model, lr: float = 1e-3, momentum_optimizer: bool = False):
        super().__init__()
        self.model = model
        self.lr = lr
        self.momentum_optimizer = momentum_optimizer

    def forward(self, batch):
        if len(batch) == 3:
            ids, mask, labels = batch
            return self.model(input_ids=ids, attention_mask=mask, labels=labels)
        pixels, labels = batch
        return self.model(pixel_values=pixels, labels=labels)

    def training_step(self, batch, batch_idx):
        return self(batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch).loss)

    def configure_optimizers(self):
        if self.momentum_optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ShardedGPT2Classifier(HFClassifier):
    """``HFClassifier`` of a GPT-2 under ``ModelParallelStrategy``: FSDP2 ``fully_shard`` per block, then the root."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def loader(ds, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    max_steps=10)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def record(run_dir, ticks, *, resume: dict | None = None, crash: bool = False, rank: int = 0,
           manifest: dict | None = None) -> dict:
    """Write ``ticks`` -- ``[(step, [(state, name, stat, value), ...]), ...]`` -- as one fit with the store's
    ``Recorder`` (what ``TickCallback`` uses); ``resume`` is a checkpoint state returned by an earlier call.

    Returns ``{global_step: checkpoint state}`` after each tick (a checkpoint written after step s has
    global_step s + 1). ``crash`` leaves the parts uncompacted, as a killed fit does.
    """
    import numpy as np

    from tick_lightning.records import Block
    from tick_lightning.store import Recorder

    rec = Recorder()
    rec.reset()
    if resume is not None:
        rec.load_state_dict(resume)
    rec.start(run_dir, rank=rank, start_step=ticks[0][0] if ticks else 0,
              manifest={"schedule": "every:10"} if manifest is None else manifest)
    states = {}
    for step, rows in ticks:
        rec.write(step, 0, [Block(s, (n,), (k,), np.array([[v]], dtype=np.float64)) for s, n, k, v in rows])
        states[step + 1] = rec.state_dict()
    rec.close(compact=not crash)
    return states


def gloo_spawn(worker, tmp_path, out: str, world: int = 2) -> None:
    """Run ``worker(rank, out)`` on ``world`` spawned CPU processes inside one gloo process group.

    Every rank waits at a barrier before the group is torn down, so no rank leaves gloo while another may
    still talk to it (a rare SIGABRT otherwise).
    """
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_rank, args=(worker, world, str(tmp_path / "gloo-init"), out), nprocs=world,
                       start_method="spawn")


def _gloo_rank(rank: int, worker, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        worker(rank, world, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- Hugging Face Trainer (tick_lightning.hf)
class TokenDicts(torch.utils.data.Dataset):
    """``token_dataset`` as the ``transformers.Trainer``'s dict items."""

    def __init__(self, ds: TensorDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        ids, mask, labels = self.ds[i]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_trainer(*args, **kwargs):
    """A ``transformers.Trainer`` whose batches come in dataset order (as ``loader`` gives them to Lightning) and whose
    loss is divided by the accumulation steps as Lightning's is: transformers 5 leaves that division out for a model
    whose forward takes loss kwargs (it passes ``num_items_in_batch`` for the model to divide by), and BERT's
    sequence-classification loss is a mean that ignores it -- with 2 accumulation steps the Trainer back-propagates
    twice the loss Lightning does (every gradient x2, seen in tests/test_hf_trainer.py)."""
    import transformers
    from torch.utils.data import SequentialSampler

    class InOrder(transformers.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.model_accepts_loss_kwargs = False

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    return InOrder(*args, **kwargs)


def hf_args(out, **kwargs):
    """``TrainingArguments`` matching ``trainer`` + ``HFClassifier`` with a no-weight-decay AdamW: constant lr 1e-3,
    no clipping, CPU, no logging, no reporting, seed 0."""
    import transformers

    defaults = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-3,
                    weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                    optim="adamw_torch", report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                    dataloader_num_workers=0, seed=0, disable_tqdm=True)
    defaults.update(kwargs)
    return transformers.TrainingArguments(**defaults)
