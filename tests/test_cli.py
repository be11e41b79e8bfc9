"""tick-lightning CLI: ls, run (the make-demo path), report, errors; every shipped YAML validates."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from recipes.command import list_recipes, main, recipes_dir

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "recipes" / "configs").glob("*.yaml"))
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.demo_train_size=48",
         "--data.demo_val_size=16", "--data.batch_size=16",
         "--model.model_config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
         "intermediate_size: 64, max_position_embeddings: 64}"]


def recipe_of(config: Path, recipes) -> str:
    matches = [r for r in recipes if config.stem == r or config.stem.startswith(r + "_")]
    assert matches, f"{config.name} belongs to no recipe of {sorted(recipes)}"
    return max(matches, key=len)


def test_ls_lists_every_recipe_and_config(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    recipes = list_recipes()
    assert {"text_classification", "image_classification", "causal_lm"} <= set(recipes)
    for name in recipes:
        assert f"\n{name}\n" in f"\n{out}"
    for config in CONFIGS:
        assert config.name in out
    assert sum(len(v) for v in recipes.values()) == len(CONFIGS)
    assert recipes_dir() == CONFIGS[0].parent.parent


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_validates(config, capsys):
    """Each YAML has a launch-command header and parses with its recipe's CLI (hub-only configs are not run)."""
    recipe = recipe_of(config, list_recipes())
    from recipes.command import _header

    header = " ".join(_header(config))
    assert f"tick-lightning run {recipe} --config recipes/configs/{config.name}" in header, header
    module = importlib.import_module(f"recipes.{recipe}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def absolute_paths(text: str) -> list[str]:
    """Tokens of ``text`` that are absolute paths (POSIX, home-relative or a Windows drive)."""
    import re

    return re.findall(r"(?:(?<=[\s:'\"\[(,=])|^)(?:/[\w.-]+/[\w./-]*|~/[\w./-]*|[A-Za-z]:\\[\w.\\-]*)", text, re.M)


def test_absolute_paths_finds_what_it_must():
    assert absolute_paths("train: /work/shared/x.tsv\n# from ~/data/a into b") == ["/work/shared/x.tsv", "~/data/a"]
    assert absolute_paths("train: data/sst2/train.tsv  # see docs/recipes.md, 1/2 of it; org/model") == []


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_has_no_absolute_path(config):
    """Shipped configs work on any machine: data paths are relative (the header says to change them)."""
    assert absolute_paths(config.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("config", [c for c in CONFIGS if "local" in c.stem], ids=lambda c: c.name)
def test_a_local_config_names_no_hub_model(config):
    """A config called local runs without network: its checkpoint is a path (``./...``), not a hub name."""
    import yaml

    model = yaml.safe_load(config.read_text(encoding="utf-8")).get("model") or {}
    for key in ("checkpoint", "tokenizer"):
        if model.get(key):
            assert str(model[key]).startswith("./"), f"{config.name}: model.{key}={model[key]!r}"


def test_ls_prints_each_config_header_whole(capsys):
    """The sentence an offline user needs was cut off (only the first three header lines were printed)."""
    from recipes.command import _header

    assert main(["ls"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for config in CONFIGS:
        assert " ".join(" ".join(_header(config)).split()) in out, config.name


def test_run_prints_run_dir_summary_and_report(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["run", "text_classification", "--run_dir", str(run_dir), *QUICK, "--trainer.max_steps=3",
                 "--tick.ticks=every:1"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out
    assert "ticks:" in out and "loss" in out and "grad_norm" in out
    assert f"report: {run_dir / 'report'}" in out
    assert (run_dir / "metrics.json").exists()
    # report delegates to tick_lightning.reporting.main
    assert main(["report", str(run_dir), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "index.html").exists()


def test_run_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "text_clasification"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'text_clasification'" in err and "text_classification" in err
    run_dir = tmp_path / "bad"
    assert main(["run", "text_classification", f"--run_dir={run_dir}", *QUICK,
                 "--model.checkpoint=bert-base-uncased"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the last line (Lightning may log above it)
    assert err.startswith("error: cannot load 'bert-base-uncased': the hub is not reachable")
    assert err.endswith("pass a local path: --model.checkpoint=/path/to/dir")
    assert not run_dir.exists()
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_tick_config_group_is_the_library_config_with_the_recipes_defaults(tmp_path):
    """The ``tick`` group is ``tick_lightning.config.TickConfig`` (every TickCallback argument but ``dirpath``, checked
    by the library), and what it holds reaches the callback; ``--tick.renorm`` entries are ``Renorm`` itself."""
    import dataclasses
    import inspect

    import tick_lightning.config
    from recipes._shared.config import TickConfig, make_tick_callback
    from tick_lightning.callback import TickCallback
    from tick_lightning.renorm.spec import Renorm

    assert issubclass(TickConfig, tick_lightning.config.TickConfig)
    tick_args = set(inspect.signature(TickCallback.__init__).parameters) - {"self", "dirpath"}  # dirpath: the run's
    assert {f.name for f in dataclasses.fields(TickConfig) if f.init} == tick_args | {"enabled"}
    with pytest.raises(ValueError, match="ranks='every' is not valid"):  # the library's own check
        TickConfig(ranks="every")
    cfg = TickConfig(norm_select="LayerNorm", patch_norms=False, ticks="every:3",
                     renorm=[Renorm(target="*.dense.weight", method="unit", at="step", dim=0, fold="*.ln")])
    tick = make_tick_callback(cfg, tmp_path / "ticks")
    assert tick.norm_select == "LayerNorm" and not tick.patch_norms and str(tick.schedule) == "every:3"
    assert [r.fold for r in tick.renorm_specs] == ["*.ln"] and tick.dirpath == str(tmp_path / "ticks")
    assert make_tick_callback(TickConfig(enabled=False), tmp_path / "ticks") is None


def test_registry_lists_every_recipe_and_the_library_imports_no_recipe_code():
    import ast
    import subprocess
    import sys

    from recipes._registry import RECIPES

    root = Path(__file__).resolve().parent.parent / "recipes"
    with_main = {p.stem for p in root.glob("*.py") if any(
        isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)}
    assert set(RECIPES) == with_main - {"command"}  # the `tick-lightning` command is not a recipe
    for name, module in RECIPES.items():
        assert importlib.import_module(module).main is not None, name
    # the library never imports the recipes (not even through importlib): importing all of it loads no recipes module
    library = Path(__file__).resolve().parents[1] / "tick_lightning"
    modules = sorted("tick_lightning." + ".".join(p.relative_to(library).with_suffix("").parts)
                     for p in library.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'recipes' or m.startswith('recipes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not [p.name for p in library.rglob("*.py") if "recipes" in "".join(
        line for line in p.read_text(encoding="utf-8").splitlines() if "import" in line)]
    # `tick-lightning ls` reads the registry only: no recipe module is imported
    code = ("import sys, recipes.command; recipes.command.list_recipes(); "
            "print(sorted(m for m in sys.modules if m.startswith('recipes.') and m.count('.') == 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['recipes._registry', 'recipes.command']"


def test_recipes_are_an_installed_package_not_a_path_edit():
    """No recipe edits sys.path; ``python -m recipes.<name>`` (the documented launch) finds everything."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert not [p.name for p in (root / "recipes").rglob("*.py") if "sys.path" in p.read_text(encoding="utf-8")]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "recipes.causal_lm", "--help"], capture_output=True, text=True,
                          env=env, timeout=180, cwd=root / "docs")
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
