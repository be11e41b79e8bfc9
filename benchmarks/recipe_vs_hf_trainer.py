"""text_classification recipe (ticks + norm patching on) vs the Hugging Face ``Trainer``, side by side.

Same initial weights (one saved checkpoint both load), same tokenized data, batch size, precision, optimizer
(fused AdamW, same lr / weight decay: the recipe's automatic choice and the HF default ``adamw_torch_fused``),
gradient clipping at norm 1.0, warmup + cosine schedule and number of steps. Reports training throughput
(examples/s between train start and train end, validation excluded) of each, their ratio (target >= 1.0),
and the final validation accuracy of each (torchmetrics, on the same split).

Usage::

    python benchmarks/recipe_vs_hf_trainer.py --steps 200 --batch-size 32
    python benchmarks/recipe_vs_hf_trainer.py --data /work/shared/data/sst2 --checkpoint <dir>   # real data
    python benchmarks/recipe_vs_hf_trainer.py --model-config '{"model_type": "bert", "hidden_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}'   # a mid-size BERT

With no ``--data`` it uses the recipe's built-in demo data and its tiny BERT (from a config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402


class WallClock(L.Callback):
    """Seconds from train start to train end (validation, export and report excluded)."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def data_args(args) -> list[str]:
    if not args.data:
        return [f"--data.demo_train_size={args.train_size}", f"--data.demo_val_size={args.val_size}"]
    d = Path(args.data)
    return [f"--data.data_files={{train: {d / 'train.tsv'}, validation: {d / 'dev.tsv'}}}",
            "--data.column_map={validation: {content: sentence}}", f"--data.max_train_samples={args.train_size}"]


def initial_checkpoint(args, out: Path) -> tuple[str, object]:
    """Save one initial model (+ tokenizer) that both sides load, so they start from the same weights."""
    from recipes import text_classification as tc

    L.seed_everything(args.seed)
    if args.data:
        source = dict(data_files={"train": str(Path(args.data) / "train.tsv"), "validation": str(Path(args.data) / "dev.tsv")},
                      column_map={"validation": {"content": "sentence"}}, max_train_samples=args.train_size)
    else:
        source = dict(demo_train_size=args.train_size, demo_val_size=args.val_size)
    dm = tc.TextClassificationData(batch_size=args.batch_size, max_length=args.max_length, tokenizer=args.checkpoint,
                                   **source)
    dm.setup("fit")
    config = json.loads(args.model_config) if args.model_config else None
    module = tc.TextClassifier(checkpoint=args.checkpoint, model_config=config, lr=args.lr)
    module.build(dm)
    module.export_model(out)
    return str(out), dm


def run_recipe_side(args, ckpt: str, run_dir: Path) -> dict:
    from recipes import text_classification as tc
    from recipes._shared.cli import run_recipe

    clock = WallClock()
    cli = run_recipe(tc.TextClassifier, tc.TextClassificationData, "text_classification", [
        "fit", f"--run_dir={run_dir}", f"--model.checkpoint={ckpt}", f"--model.lr={args.lr}",
        "--model.weight_decay=0.01", "--model.warmup_ratio=0.06", "--trainer.gradient_clip_val=1.0",
        f"--data.batch_size={args.batch_size}",
        f"--data.max_length={args.max_length}", *data_args(args), f"--trainer.max_steps={args.steps}",
        f"--trainer.precision={args.precision}", "--trainer.check_val_every_n_epoch=1000",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", f"--tick.ticks={args.ticks}", "--tick.patch_norms=true",
        f"--seed_everything={args.seed}"],
        links=[("model.checkpoint", "data.tokenizer")], trainer_defaults={"max_epochs": 1000, "callbacks": [clock]})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"seconds": clock.seconds, "steps": metrics["global_step"], "accuracy": metrics["validate"]["val_acc"],
            "examples_per_s": metrics["global_step"] * args.batch_size / clock.seconds,
            "fused_optimizer": bool(cli.trainer.optimizers[0].defaults.get("fused"))}


def run_hf_side(args, ckpt: str, dm) -> dict:
    from torchmetrics.functional.classification import multiclass_accuracy
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    model.train()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
            max_steps=args.steps, learning_rate=args.lr, weight_decay=0.01, warmup_steps=int(0.06 * args.steps),
            lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", eval_strategy="no",
            report_to="none", use_cpu=not torch.cuda.is_available(), seed=args.seed, dataloader_num_workers=0,
            bf16=args.precision.startswith("bf16"), fp16=args.precision.startswith("16"), disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=dm.splits["train"],
                          data_collator=DataCollatorWithPadding(dm.tokenizer), callbacks=[clock])
        trainer.train()
        fused = bool(getattr(trainer.optimizer, "optimizer", trainer.optimizer).defaults.get("fused"))
        pred = trainer.predict(dm.splits["validation"])
    acc = multiclass_accuracy(torch.as_tensor(pred.predictions).argmax(-1), torch.as_tensor(pred.label_ids),
                              num_classes=dm.num_labels, average="micro")
    return {"seconds": clock.seconds, "steps": args.steps, "accuracy": float(acc),
            "examples_per_s": args.steps * args.batch_size / clock.seconds, "fused_optimizer": fused}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--val-size", type=int, default=400)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--ticks", default="log:20", help="the recipe's tick schedule")
    p.add_argument("--data", default=None, help="SST-2 folder (train.tsv, dev.tsv); default: the demo data")
    p.add_argument("--checkpoint", default=None, help="pretrained model dir; default: the recipe's tiny BERT config")
    p.add_argument("--model-config", default=None,
                   help='JSON config of the model built when no --checkpoint, e.g. \'{"model_type": "bert", '
                        '"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, '
                        '"intermediate_size": 1024}\'')
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds, alternating which side goes first")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {"recipe": [], "hf_trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, dm = initial_checkpoint(args, Path(tmp) / "init")
        for r in range(args.rounds):
            order = ("hf_trainer", "recipe") if r % 2 == 0 else ("recipe", "hf_trainer")
            for side in order:
                out = run_hf_side(args, ckpt, dm) if side == "hf_trainer" else \
                    run_recipe_side(args, ckpt, Path(tmp) / f"run{r}")
                runs[side].append(out)
                print(f"round {r} {side:10s} {out['examples_per_s']:9.1f} examples/s", flush=True)

    def median_run(side: str) -> dict:  # the run with the median throughput
        ordered = sorted(runs[side], key=lambda o: o["examples_per_s"])
        return ordered[(len(ordered) - 1) // 2]

    recipe, hf = median_run("recipe"), median_run("hf_trainer")
    result = {"recipe": recipe, "hf_trainer": hf, "throughput_ratio_recipe_over_hf":
              recipe["examples_per_s"] / hf["examples_per_s"], "batch_size": args.batch_size,
              "precision": args.precision, "steps": args.steps, "ticks": args.ticks, "rounds": args.rounds,
              "per_round_examples_per_s": {k: [o["examples_per_s"] for o in v] for k, v in runs.items()}}
    # recipe / HF within each round: the two runs of a round are back to back and share the machine's load
    paired = sorted(r["examples_per_s"] / h["examples_per_s"] for r, h in zip(runs["recipe"], runs["hf_trainer"]))
    result["paired_ratios"] = [r["examples_per_s"] / h["examples_per_s"] for r, h in zip(runs["recipe"], runs["hf_trainer"])]
    result["paired_ratio_median"] = (paired[(len(paired) - 1) // 2] + paired[len(paired) // 2]) / 2
    print(json.dumps(result, indent=2))
    print(f"throughput ratio (recipe / HF Trainer): {result['throughput_ratio_recipe_over_hf']:.3f} (median runs), "
          f"{result['paired_ratio_median']:.3f} (median of per-round ratios)   "
          f"accuracy recipe {recipe['accuracy']:.4f} vs HF {hf['accuracy']:.4f}")
    return result


if __name__ == "__main__":
    main()
