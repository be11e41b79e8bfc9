"""benchmarks/early_warning.py at CI size: when the loss moved, and one real run's row."""

from __future__ import annotations

import argparse
import math

import tiny

bench = tiny.load_benchmark("early_warning")


def test_the_loss_moved_at_the_first_mean_above_its_lowest_or_not_finite():
    assert bench.moved_step([3.0] * 30 + [2.0] * 30 + [4.0] * 30, warmup=5, margin=0.25) == 61
    assert bench.moved_step([3.0 - 0.01 * i for i in range(100)], warmup=5, margin=0.25) is None  # falling: never
    assert bench.moved_step([2.0] * 40 + [math.nan] * 5, warmup=5, margin=0.25) == 40  # a NaN moves it at once
    assert bench.moved_step([5.0] * 5 + [2.0] * 30, warmup=20, margin=0.25) is None  # the warm-up's fall: not a move


def test_a_real_run_row_is_consistent(tmp_path):
    import torch

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    train, val, vocab = bench.char_data(str(text))
    val_batches = torch.stack([val[s: s + 17] for s in range(0, 64, 16)]).view(2, 2, -1)
    args = argparse.Namespace(steps=30, warmup=5, seq=16, batch=4, tick_every=10, grad_clip=0.0, moved=0.25)
    row = bench.run("h16l1", 1e-2, 0, (train, val_batches, vocab), args)
    assert row["size"] == "h16l1" and math.isfinite(row["final_loss"]) and row["final_loss"] < row["init_loss"]
    # a healthy run: the loss never moved the wrong way, no warning, no lead
    assert (row["moved_step"], row["warn_step"], row["lead"], row["warnings"]) == (None, None, None, 0), row
