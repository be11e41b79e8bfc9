"""Bad input to a recipe: one ``error:`` line naming the bad value and what to do, before training, nothing written.

Each case runs the recipe's ``main`` (what ``python recipes/<name>.py`` runs) and checks: exit status 2, no
traceback, the last stderr line starts with ``error:`` and names the bad value, and no run directory exists.
"""

from __future__ import annotations

import io

import pytest

from recipes import causal_lm as clm
from recipes import image_classification as ic
from recipes import sequential_recommendation as seqrec
from recipes import text_classification as tc

TEXT_QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--data.demo_train_size=32", "--data.demo_val_size=16", "--data.batch_size=8",
              "--model.model_config={model_type: bert, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, "
              "intermediate_size: 32, max_position_embeddings: 64}", "--trainer.max_steps=1"]


def refused(capsys, tmp_path, main, *args: str) -> str:
    """Run ``main(["fit", --run_dir, *args])``; return its one error line after checking the refusal."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--run_dir={run_dir}", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err[-2000:]
    assert not run_dir.exists(), f"left behind: {sorted(p.name for p in run_dir.iterdir())}"
    return line


def test_local_checkpoint_path_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "models" / "bert-finetuned"
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK, f"--model.checkpoint={missing}")
    assert f"--model.checkpoint='{missing}': no such local directory" in line
    assert "hub" not in line.split(":")[1]  # not "the hub is not reachable"


def test_ckpt_path_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "old" / "last.ckpt"
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK, f"--ckpt_path={missing}")
    assert f"--ckpt_path='{missing}' does not exist" in line and "--ckpt_path=last" in line


@pytest.mark.parametrize("content", [b"", b"label\tsentence\n1\tgood \xe9t\xe9\n"], ids=["zero-bytes", "latin1"])
def test_tsv_that_is_empty_or_not_utf8(capsys, tmp_path, content):
    good = tmp_path / "train.tsv"
    good.write_text("label\tsentence\n1\tgood film\n0\tbad film\n")
    bad = tmp_path / "dev.tsv"
    bad.write_bytes(content)
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK, f"--data.data_files={{train: {good}, validation: {bad}}}")
    assert f"'{bad}'" in line
    assert ("is empty (0 bytes)" in line) if not content else ("is not UTF-8: byte 0xe9 at offset 22" in line)


def test_text_file_that_is_not_utf8(capsys, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes("the cat sees the ball .\n".encode() * 20 + b"caf\xe9\n")
    line = refused(capsys, tmp_path, clm.main, "--trainer.max_steps=1", f"--data.data_files={{train: {text}}}",
                   "--data.val_split=null", "--data.val_fraction=0.2")
    assert f"'{text}' is not UTF-8: byte 0xe9 at offset {24 * 20 + 3}" in line and "iconv" in line


@pytest.mark.parametrize(("flag", "expected"), [
    ("--trainer.max_steps=-5", "max_steps` must be a non-negative integer or -1 (infinite steps). You passed in -5"),
    ("--tick.ticks=bogus:3", "bad value in the config: tick.ticks: Malformed tick schedule term 'bogus:3'; valid "
                             "terms: every:N"),
    ("--tick.state_ticks={weight: evry:3}", "tick.state_ticks: Malformed tick schedule term 'evry:3' (did you mean "
                                            "'every:3'?); valid terms: every:N"),
    ("--tick.renorm=[{target: linear, method: bogus}]", "tick.renorm: Renorm method 'bogus' is unknown; valid "
                                                        "methods: layernorm, unit, center."),
    ("--tick.ranks=every", "ranks='every' is not valid; choose one of ('zero', 'all')"),
    ("--trainer.max_stepz=3", "unrecognized arguments: --trainer.max_stepz=3"),
    # a union of Literals: the choices in one sentence, not jsonargparse's report of each subtype
    ("--trainer.precision=bf17", "bad value in the config: --trainer.precision='bf17' is not valid; choose one of 64, "
                                 "32, 16, transformer-engine,"),
    ("--checkpoint.every_n_train_steps=0", "--checkpoint.every_n_train_steps=0 must be >= 1"),
    # a TickCallback added through --trainer.callbacks: its own error, not jsonargparse's 100-line union report
    ("--trainer.callbacks+=tick_lightning.TickCallback --trainer.callbacks.ticks=evry:5",
     "bad value in the config: trainer.callbacks: Malformed tick schedule term 'evry:5' (did you mean 'every:5'?); "
     "valid terms: every:N"),
])
def test_bad_trainer_tick_and_checkpoint_values(capsys, tmp_path, flag, expected):
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK, *flag.replace(" --", "\0--").split("\0"))  # flags, not words
    assert expected in line, line


@pytest.mark.parametrize(("flag", "expected"), [
    ("--tick.select=[nomatch]", "bad --tick option: Parameter selector 'nomatch' matches nothing. Closest parameter "
                                "names: ['model.bert."),
    ("--tick.activations=nomatch", "bad --tick option: Module selector 'nomatch' matches nothing."),
    ("--tick.renorm=[{target: nomatch, method: unit}]", "bad --tick option: Renorm #0 (target='nomatch'): Parameter "
                                                        "selector 'nomatch' matches nothing."),
    ("--tick.renorm=[{target: norm, method: unit}]", "bad --tick option: Renorm #0 (target='norm') selects 1-D "
                                                     "parameter 'model.bert.embeddings.LayerNorm.weight' of shape [16]; "
                                                     "method 'unit' works on rows of matrices (a row of a 1-D tensor "
                                                     "is the whole vector). Target weight matrices instead, e.g. "
                                                     "target='linear' or 'attention'."),
])
def test_a_selector_that_fits_no_part_of_the_model_is_refused_before_training(capsys, tmp_path, flag, expected):
    """Selectors are checked against the model the recipe built, before the run directory is written: not at fit
    start, with a traceback and a run directory holding a config and logs."""
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK, flag)
    assert expected in line, line


def test_yaml_syntax_error_names_the_file(capsys, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  lr: [1, 2\ndata:\n  batch_size: 8\n")
    line = refused(capsys, tmp_path, tc.main, "--config", str(config))
    assert f"--config '{config}' is not valid YAML at line 3, column 5" in line, line


def test_corrupt_images_in_an_image_folder_are_named_before_training(capsys, tmp_path):
    from PIL import Image
    from test_recipes_image import QUICK, write_image_folder

    train = write_image_folder(tmp_path / "data" / "train", per_class=2)
    val = write_image_folder(tmp_path / "data" / "val", per_class=1, seed=1)
    (train / "red" / "garbage.jpg").write_bytes(b"not an image at all")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG")
    (train / "blue" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    line = refused(capsys, tmp_path, ic.main, *QUICK, f"--data.data_files={{train: {train}, validation: {val}}}")
    assert f"image folder of split 'train' '{train}' has 2 unreadable image(s) of 10" in line
    assert str(train / "red" / "garbage.jpg") in line and str(train / "blue" / "truncated.jpg") in line


def test_recsys_interaction_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "interactions.txt"
    path.write_bytes(b"1 1\n1 2\n1 3\n# caf\xe9\n")
    line = refused(capsys, tmp_path, seqrec.main, "--trainer.enable_progress_bar=false", f"--data.path={path}")
    assert f"interaction file '{path}' is not UTF-8: byte 0xe9 at offset 17" in line


# ------------------------------------------------------------------------------------------------ issue 36's cases
def _tsvs(tmp_path, train: str, dev: str = "label\tsentence\n1\tgood film\n0\tbad film\n"):
    (tmp_path / "train.tsv").write_text(train)
    (tmp_path / "dev.tsv").write_text(dev)
    return f"--data.data_files={{train: {tmp_path / 'train.tsv'}, validation: {tmp_path / 'dev.tsv'}}}"


@pytest.mark.parametrize("train, expected", [
    ("label\tsentence\n1\tgood film\n\tbad film\n", "has an empty label in row 3"),
    ("label\tsentence\n1\tgood film\nnan\tbad film\n", "has the label 'nan' in row 3"),
    ("label\tsentence\n1\tgood film\n0\tbad\tfilm\n", "row 3 has 3 fields, the header has 2"),
])
def test_labels_and_ragged_rows_are_named_by_row(capsys, tmp_path, train, expected):
    """An empty or NaN label was ``KeyError: '1'`` (a traceback), a ragged row an error naming no row."""
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK, _tsvs(tmp_path, train))
    assert f"'{tmp_path / 'train.tsv'}' {expected}" in line, line


def test_max_steps_zero_is_refused_before_the_run_directory(capsys, tmp_path):
    """It was a traceback and a misleading schedule error about log:20, with the run directory left behind."""
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK[:-1], "--trainer.max_steps=0")
    assert "--trainer.max_steps=0 trains nothing" in line, line


@pytest.mark.parametrize("flag, expected", [
    ("--trainer.max_stpes=20", "unrecognized arguments: --trainer.max_stpes=20 (did you mean --trainer.max_steps?)"),
    ("--trainer.max_step=20", "unrecognized arguments: --trainer.max_step=20 (did you mean --trainer.max_steps?)"),
])
def test_a_flag_typo_gets_a_suggestion_and_an_abbreviation_is_refused(capsys, tmp_path, flag, expected):
    """``--trainer.max_step`` was silently taken as ``max_steps`` (argparse's prefix matching)."""
    line = refused(capsys, tmp_path, tc.main, *TEXT_QUICK, flag)
    assert expected in line, line
