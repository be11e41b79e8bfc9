"""benchmarks/lr_sensitivity.py: the sensitivity / divergence arithmetic by hand, and both parts end to end, tiny."""

import json
import math

import pytest
from tiny import load_benchmark, tiny_bert

bench = load_benchmark("lr_sensitivity")
NAN = float("nan")


def test_sensitivity_matches_a_hand_computed_curve():
    # clipped at init 4: 3, 2, 2.5, 4 (nan -> init); best 2; gaps 1, 0, 0.5, 2 -> mean 0.875
    assert bench.sensitivity([3.0, 2.0, 2.5, NAN], init=4.0) == pytest.approx(0.875)
    # a loss above init counts as init: 5 -> 4; gaps 3, 0 -> 1.5
    assert bench.sensitivity([5.0, 1.0], init=4.0) == pytest.approx(1.5)
    assert bench.sensitivity([2.0, 2.0, 2.0], init=4.0) == 0.0
    assert bench.sensitivity([float("inf"), 2.0], init=4.0) == pytest.approx(1.0)


def test_divergence_and_stable_range():
    assert bench.diverged(4.1, 4.0) and bench.diverged(NAN, 4.0) and not bench.diverged(3.9, 4.0)
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    losses = [[3.0, 3.1], [2.0, 2.1], [2.5, 4.5], [NAN, NAN]]  # lr 0.1 diverges for seed 1 only
    assert bench.stable_range(lrs, losses, inits=[4.0, 4.0]) == (1e-3, 1e-2)
    assert bench.stable_range(lrs, [[5.0]] * 4, inits=[4.0]) == (None, None)


def test_summary_of_hand_made_runs():
    runs = [dict(size="s", variant="none", lr=lr, seed=seed, init_loss=4.0, final_loss=loss, diverged=loss > 4)
            for seed, curve in enumerate([[3.0, 2.0, 5.0], [3.0, 2.2, 2.6]]) for lr, loss in zip([1e-3, 1e-2, 1e-1], curve)]
    (row,) = bench.summarize_runs(runs)
    # seed 0: clipped 3, 2, 4 -> gaps 1, 0, 2 -> 1.0; seed 1: 3, 2.2, 2.6 -> 0.8, 0, 0.4 -> 0.4
    assert row["sensitivity"] == pytest.approx(0.7)
    assert row["sensitivity_sd"] == pytest.approx(math.sqrt(0.18))
    assert (row["stable_lo"], row["stable_hi"], row["diverged_runs"], row["runs"]) == (1e-3, 1e-2, 1, 6)
    # lr 0.1 diverged for seed 0 only: the first lr where a seed diverged, and no lr where all seeds did
    assert row["diverged_per_lr"] == [0, 0, 1]
    assert (row["first_diverged_lr"], row["all_seeds_diverged_lr"]) == (1e-1, None)
    assert row["best_loss"] == pytest.approx(2.1) and row["best_lr"] == 1e-2
    assert (row["near_lo"], row["near_hi"]) == (1e-2, 1e-2)  # mean curve 3.0, 2.1, 3.8: only 2.1 within 0.1


def test_lm_sweep_end_to_end_records_ticks_and_renorm(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question.\n" * 200)
    out = tmp_path / "results"
    bench.main(["lm", "--text", str(text), "--sizes", "h16l1", "--variants", "none", "qk_ticks", "--lrs", "1e-3", "10",
                "--seeds", "0", "--steps", "4", "--warmup", "1", "--seq", "8", "--batch", "4", "--val-batches", "2",
                "--tick-every", "2", "--out", str(out)])
    runs = {(r["variant"], r["lr"]): r for r in map(json.loads, (out / "lr_sensitivity_runs.jsonl").read_text().splitlines())}
    assert set(runs) == {("none", 1e-3), ("qk_ticks", 1e-3), ("none", 10.0), ("qk_ticks", 10.0)}
    small = runs[("qk_ticks", 1e-3)]
    assert [t["step"] for t in small["ticks"]] == [0, 2, 3]  # 3: the last step
    # weights are recorded before the tick's step: at 0 the init scale (16 rows of ~0.02 * 4), at 2 unit rows (norm 4)
    assert small["ticks"][0]["qk_weight_norm"] < 0.5
    assert small["ticks"][1]["qk_weight_norm"] == pytest.approx(4.0, rel=0.05)
    assert runs[("none", 1e-3)]["ticks"][1]["qk_weight_norm"] < 0.5
    assert all(math.isfinite(t["attn_logit"]) and t["attn_logit"] > 0 for t in small["ticks"])
    assert runs[("none", 10.0)]["diverged"] and not runs[("none", 1e-3)]["diverged"]
    # a second invocation resumes: nothing is run twice
    bench.main(["lm", "--text", str(text), "--sizes", "h16l1", "--variants", "none", "--lrs", "1e-3", "--seeds", "0",
                "--steps", "4", "--out", str(out)])
    assert len((out / "lr_sensitivity_runs.jsonl").read_text().splitlines()) == 4
    bench.main(["summarize", "--out", str(out), "--figure", str(tmp_path / "fig.png"), "--sub-max-lr", "1e-3"])
    summary = json.loads((out / "lr_sensitivity_summary.json").read_text())
    # over lr 1e-3 alone a curve is flat; over both lrs "none" is not (lr 10 diverged and counts as init)
    none = next(r for r in summary if r["variant"] == "none")
    assert none["sub_sensitivity"] == 0.0 and none["sensitivity"] > 0
    assert none["first_diverged_lr"] == 10.0 and none["all_seeds_diverged_lr"] == 10.0
    assert {r["variant"] for r in summary} == {"none", "qk_ticks"} and (tmp_path / "fig.png").stat().st_size > 0
    assert (out / "lr_sensitivity_final_loss.csv").read_text().count("\n") == 5


def test_minilm_part_on_a_tiny_checkpoint(tmp_path):
    from recipes._shared.tokenizer import train_tokenizer

    rows = [(k % 2, f"a {['bad', 'good'][k % 2]} film") for k in range(32)]
    (tmp_path / "train.tsv").write_text("label\tsentence\n" + "".join(f"{y}\t{x}\n" for y, x in rows))
    (tmp_path / "dev.tsv").write_text("label\tcontent\n" + "".join(f"{y}\t{x}\n" for y, x in rows[:8]))
    tok = train_tokenizer([x for _, x in rows], vocab_size=30)
    tiny_bert(hidden_size=16, intermediate_size=16, vocab_size=len(tok), pad_token_id=tok.pad_token_id).save_pretrained(
        tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "results"
    bench.main(["minilm", "--sst2", str(tmp_path), "--checkpoint", str(tmp_path / "ckpt"), "--variants", "none", "qk_step",
                "--lrs", "1e-3", "--seeds", "0", "--steps", "2", "--batch", "4", "--max-length", "8", "--tick-every", "1",
                "--out", str(out)])
    runs = [json.loads(line) for line in (out / "lr_sensitivity_minilm_runs.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in runs] == ["none", "qk_step"]
    assert all(0 <= r["dev_acc"] <= 1 and [t["step"] for t in r["ticks"]] == [0, 1] for r in runs)
