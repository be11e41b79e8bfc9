"""CIFAR-10 test accuracy of the image_classification recipe with a small ViT from scratch (target >= 0.80).

Extracts the CIFAR-10 ImageFolder archive (``cifar10/{train,test}/<class>/*.jpg``) to a temporary folder and
runs the recipe on it: ViT patch 4 on 32x32 images, random crop + flip augmentation, AdamW with warmup +
cosine, ticks and norm patching on. ~80% needs on the order of 100-200 epochs: a GPU job. On a CPU use
``--max-train-samples`` / ``--max-steps`` only to check that it runs.

Usage::

    python benchmarks/cifar10_vit.py --archive /work/shared/data/vision/cifar10.tar.gz --epochs 200   # GPU
    python benchmarks/cifar10_vit.py --max-train-samples 512 --max-steps 10 --batch-size 32           # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def extract(archive: str, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    roots = [p.parent for p in dest.rglob("train") if p.is_dir() and (p.parent / "test").is_dir()]
    if not roots:
        sys.exit(f"{archive} has no <root>/train and <root>/test folders")
    return roots[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", default="/work/shared/data/vision/cifar10.tar.gz")
    p.add_argument("--data-dir", default=None, help="an already extracted folder with train/ and test/")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--run-dir", default="runs/cifar10_vit")
    p.add_argument("extra", nargs="*", help="more recipe overrides")
    args, unknown = p.parse_known_args(argv)
    args.extra = [*args.extra, *unknown]  # recipe overrides such as --trainer.precision=bf16-mixed
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from recipes import image_classification as ic

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else extract(args.archive, Path(tmp))
        start = time.perf_counter()
        overrides = [
            "fit", f"--run_dir={args.run_dir}",
            f"--model.model_config={{model_type: vit, patch_size: 4, hidden_size: {args.hidden}, "
            f"num_hidden_layers: {args.layers}, num_attention_heads: {args.heads}, "
            f"intermediate_size: {2 * args.hidden}, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}",
            f"--model.lr={args.lr}", "--model.weight_decay=0.05", "--model.warmup_ratio=0.05",
            f"--data.data_files={{train: {root / 'train'}, validation: {root / 'test'}}}", "--data.image_size=32",
            f"--data.batch_size={args.batch_size}", f"--data.num_workers={args.num_workers}",
            f"--trainer.max_epochs={args.epochs}", f"--trainer.max_steps={args.max_steps}",
            "--trainer.gradient_clip_val=1.0", "--trainer.check_val_every_n_epoch=10",
            "--tick.ticks=log:50", *args.extra]
        if args.max_train_samples:
            overrides.append(f"--data.max_train_samples={args.max_train_samples}")
        cli = ic.cli(overrides)
        seconds = time.perf_counter() - start
    metrics = json.loads((Path(args.run_dir) / "metrics.json").read_text())
    result = {"steps": metrics["global_step"], "epochs": metrics["epoch"],
              "train_images": len(cli.datamodule.splits["train"]), "test_accuracy": metrics["validate"]["val_acc"],
              "wall_seconds": round(seconds, 1), "precision": str(cli.trainer.precision), "target": 0.80}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
