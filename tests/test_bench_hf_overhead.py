"""benchmarks/hf_trainer_overhead.py at CI size: each variant is the run it says (records only with the callback,
the Trainer's own logs only with logging_steps=1), and its clock counts the timed steps."""

from __future__ import annotations

import argparse

import tiny
import torch

bench = tiny.load_benchmark("hf_trainer_overhead")


def test_each_variant_is_the_run_it_names(tmp_path, monkeypatch):
    import transformers

    def mkdtemp(prefix="", **kwargs):
        (tmp_path / prefix).mkdir()
        return str(tmp_path / prefix)

    monkeypatch.setattr("tempfile.mkdtemp", mkdtemp)
    args = argparse.Namespace(steps=6, warmup=2, hidden=32, layers=1, batch=4, seq=8, vocab=50)
    torch.manual_seed(0)
    state = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128,
        max_position_embeddings=8, num_labels=2)).state_dict()
    data = bench.Tokens(4 * 6, 8, 50)
    for variant in bench.VARIANTS:
        wall, cpu = bench.run(variant, args, data, state)
        assert wall > 0 and cpu > 0
    runs = {p.name.split("-")[2]: p for p in tmp_path.iterdir()}
    assert sorted(runs) == sorted(bench.VARIANTS)
    assert (runs["tick"] / "ticks").is_dir() and not (runs["plain"] / "ticks").exists()
    assert not (runs["log1"] / "ticks").exists()
