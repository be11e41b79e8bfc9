"""Fine-tune the same model with and without weight re-normalization; report loss, accuracy and cost side by side.

Two parts, both in one run so the numbers are comparable:

1. Quality: a tiny BERT (built from a config, no download) fine-tuned with Lightning on a sequence
   classification task, once per configuration and seed: no re-normalization, ``center`` / ``unit`` after
   every step (nGPT-style), ``layernorm`` with ``keep_norm`` at ticks. Prints final training loss and
   held-out accuracy (torchmetrics) per configuration. Default task: synthetic, learnable (seconds per run).
   ``--sst2 /work/shared/data/sst2`` uses real SST-2 sentences with a WordPiece tokenizer trained on the fly
   (a from-scratch tiny model: expect well below pretrained accuracies; what matters is the side-by-side).
2. Cost of ``at="step"``: a plain training loop (forward, backward, AdamW) timed with and without the
   engine's ``apply`` after each step (on CPU: per tensor), the stacked-groups path the engine uses on
   accelerators, and a naive per-tensor Python loop for comparison; configurations are
   interleaved step by step so machine load hits all of them alike. Prints medians and ratios.

Usage:
    python benchmarks/renorm_experiment.py                        # synthetic task, ~2 min on 2 CPU cores
    python benchmarks/renorm_experiment.py --sst2 /work/shared/data/sst2 --steps 300 --train-rows 8000
    python benchmarks/renorm_experiment.py --skip-quality --cost-hidden 768 --cost-layers 12 --device cuda  # ~110M
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------------------------- data
def synthetic(n: int, seq: int, vocab: int, seed: int):
    """Label: is the one marker token (1 or 2), at a random position, a 1? 10% label noise, so best accuracy ~0.9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    first = torch.randint(1, 3, (n,), generator=g)
    ids[torch.arange(n), torch.randint(1, seq, (n,), generator=g)] = first
    labels = (first == 1).long()
    flip = torch.rand(n, generator=g) < 0.1
    labels[flip] = 1 - labels[flip]
    return ids, torch.ones_like(ids), labels


def sst2(path: str, rows: int, seq: int, vocab: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    def read(name):
        with open(os.path.join(path, name), newline="") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            text_col = [c for c in reader.fieldnames if c != "label"][0]  # 'sentence' (train) / 'content' (dev)
            return [(r[text_col], int(r["label"])) for r in reader]

    train, dev = read("train.tsv")[:rows], read("dev.tsv")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([t for t, _ in train], trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]"]))
    tok.enable_truncation(seq - 1)

    def encode(pairs):
        ids = torch.zeros(len(pairs), seq, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (text, _) in enumerate(pairs):
            e = [2] + tok.encode(text).ids
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        return ids, mask, torch.tensor([y for _, y in pairs])

    return encode(train), encode(dev), tok.get_vocab_size()


def bert(vocab: int, hidden: int, layers: int, seq: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                     intermediate_size=4 * hidden, max_position_embeddings=max(64, seq), num_labels=2)
    return BertForSequenceClassification(cfg)


# ------------------------------------------------------------------------------------------ quality
CONFIGS = {
    "none": [],
    "center@step": [("center", "step", False)],
    "unit@step": [("unit", "step", False)],
    "layernorm+keep@every:20": [("layernorm", "every:20", True)],
}
TARGET = ["*.encoder.layer.*.weight", "!norm"]  # every Linear weight of the encoder


def quality(args) -> list[dict]:
    import lightning as L
    import torchmetrics
    from torch.utils.data import DataLoader, TensorDataset

    from tick_lightning import Renorm, RenormCallback

    if args.sst2:
        train, dev, vocab = sst2(args.sst2, args.train_rows, args.seq, 4000)
    else:
        vocab = 64
        train, dev = synthetic(args.train_rows, args.seq, vocab, 0), synthetic(512, args.seq, vocab, 1)

    class Classifier(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model, self.losses = model, []
            self.acc = torchmetrics.classification.BinaryAccuracy()

        def training_step(self, batch, _):
            loss = self.model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
            self.losses.append(float(loss))
            return loss

        def validation_step(self, batch, _):
            self.acc.update(self.model(input_ids=batch[0], attention_mask=batch[1]).logits.argmax(-1), batch[2])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=args.lr, weight_decay=0.01)

    results = []
    for name, specs in CONFIGS.items():
        for seed in range(args.seeds):
            module = Classifier(bert(vocab, args.hidden, args.layers, args.seq, seed))
            callbacks = []
            if specs:
                renorms = [Renorm(TARGET, method=m, at=at, keep_norm=k) for m, at, k in specs]
                callbacks.append(RenormCallback(renorms, ticks="every:50", dirpath=tempfile.mkdtemp()))
            trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                                default_root_dir=tempfile.mkdtemp())
            torch.manual_seed(seed)
            start = time.perf_counter()
            trainer.fit(module, DataLoader(TensorDataset(*train), batch_size=args.batch, shuffle=True))
            seconds = time.perf_counter() - start
            trainer.validate(module, DataLoader(TensorDataset(*dev), batch_size=256), verbose=False)
            tail = module.losses[-max(1, args.steps // 10):]
            results.append(dict(config=name, seed=seed, loss=sum(tail) / len(tail), acc=float(module.acc.compute()),
                                seconds=seconds))
            print(f"  {name:<26} seed {seed}: train loss {results[-1]['loss']:.4f}  dev acc {results[-1]['acc']:.4f}"
                  f"  ({seconds:.1f} s)", flush=True)
    return results


# --------------------------------------------------------------------------------------------- cost
def naive_unit_(params: list[torch.Tensor]) -> None:
    """What the engine replaces: one small chain of kernels per tensor, launched from a Python loop."""
    with torch.no_grad():
        for p in params:
            x = p.float()
            p.copy_((x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5)).to(p.dtype))


def cost(args) -> dict:
    from tick_lightning.renorm import Renorm, RenormEngine, RenormPlan

    vocab = 1000
    device = torch.device(args.device)
    ids, mask, labels = (t.to(device) for t in synthetic(args.batch, args.seq, vocab, 0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # time finished work, not launches
    runs = {}
    for name in ("no renorm", "engine unit@step", "stacked groups unit@step", "naive loop unit@step"):
        model = bert(vocab, args.hidden, args.layers, args.seq, 0).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine = None
        if name.startswith("engine"):
            engine = RenormEngine([Renorm(TARGET, method="unit", at="step")])
            engine.resolve(model)
        weights = [p for n, p in model.named_parameters() if ".encoder.layer." in n and p.dim() == 2]
        # the engine's accelerator path forced on: same-shape tensors stacked, one kernel chain per group
        stacked = RenormPlan(weights, -1, batch=True) if name.startswith("stacked") else None
        runs[name] = dict(model=model, opt=opt, engine=engine, stacked=stacked, weights=weights, step=[], renorm=[])
    n_params = sum(p.numel() for p in runs["no renorm"]["model"].parameters())
    n_target = sum(p.numel() for p in runs["no renorm"]["weights"])
    for step in range(args.cost_steps + 2):
        for name, r in runs.items():  # interleaved: drift in machine load hits every configuration alike
            sync()
            t0 = time.perf_counter()
            loss = r["model"](input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            sync()
            t1 = time.perf_counter()
            if r["engine"] is not None:
                r["engine"].apply(step, False, None, record=False)
            elif r["stacked"] is not None:
                r["stacked"].run("unit")
            elif name.startswith("naive"):
                naive_unit_(r["weights"])
            sync()
            t2 = time.perf_counter()
            if step >= 2:  # warm-up
                r["step"].append(t2 - t0)
                r["renorm"].append(t2 - t1)
    base = statistics.median(runs["no renorm"]["step"])
    out = dict(params=n_params, target=n_target, base_ms=base * 1e3)
    print(f"  model: {n_params / 1e6:.1f}M parameters, {n_target / 1e6:.1f}M re-normalized, batch {args.batch}x{args.seq}")
    for name, r in runs.items():
        med, ren = statistics.median(r["step"]), statistics.median(r["renorm"])
        out[name] = dict(step_ms=med * 1e3, renorm_ms=ren * 1e3, renorm_share=ren / med, ratio=med / base)
        print(f"  {name:<22} step {med * 1e3:8.1f} ms   renorm {ren * 1e3:7.2f} ms ({100 * ren / med:5.2f}% of step)"
              f"   step time vs no renorm x{med / base:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sst2", default=None, help="directory with SST-2 train.tsv/dev.tsv (default: synthetic task)")
    parser.add_argument("--train-rows", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cost-steps", type=int, default=20)
    parser.add_argument("--cost-hidden", type=int, default=256)
    parser.add_argument("--cost-layers", type=int, default=4)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--device", default="cpu", help="device of the cost measurement, e.g. cuda")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    if not args.skip_quality:
        print(f"Quality: {'SST-2' if args.sst2 else 'synthetic task'}, BERT hidden {args.hidden} x {args.layers} layers, "
              f"{args.steps} steps, batch {args.batch}, {args.seeds} seeds")
        results = quality(args)
        print("\n| configuration | train loss (last 10%) | dev accuracy | fit seconds |\n|---|---|---|---|")
        for name in CONFIGS:
            rows = [r for r in results if r["config"] == name]
            loss = statistics.mean(r["loss"] for r in rows)
            acc = [r["acc"] for r in rows]
            print(f"| {name} | {loss:.4f} | {statistics.mean(acc):.4f} ({', '.join(f'{a:.3f}' for a in acc)}) | "
                  f"{statistics.mean(r['seconds'] for r in rows):.1f} |")
    if args.skip_cost:
        return
    print(f"\nCost of at='step': BERT hidden {args.cost_hidden} x {args.cost_layers} layers, median of {args.cost_steps} steps")
    args.hidden, args.layers = args.cost_hidden, args.cost_layers
    cost(args)


if __name__ == "__main__":
    main()
