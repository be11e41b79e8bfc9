"""The Lightning plugin surfaces: callbacks from the entry point (environment variables) and NormPatchPrecision.

Subprocess tests run tests/plugin_script.py, an unmodified Lightning script, with the entry point found by
``importlib.metadata`` as for an installed package: a ``.dist-info`` written from pyproject.toml's own
declaration comes first on the subprocess's path (it shadows an installed tick-lightning of the same name).
"""

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import lightning as L
import pytest
import tiny
import tomllib
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from tick_lightning import NormPatchPrecision, Renorm, TickCallback, load_ticks, patch_norms
from tick_lightning.entry import ENV_VARIABLES, callbacks_factory, pytorch_lightning_callbacks_factory
from tick_lightning.norms.patch import is_patched
from tick_lightning.plugin import EnvironmentTickCallback, PluginEnvironmentError, callbacks_from_environment
from tick_lightning.records import STATES

HERE = Path(__file__).parent
ROOT = HERE.parent
GROUP = "lightning.pytorch.callbacks_factory"
PL_GROUP = "pytorch_lightning.callbacks_factory"  # the group the standalone pytorch_lightning package reads
SCRIPT_STEPS = 10  # plugin_script.py's default max_steps
LAST = SCRIPT_STEPS - 1  # the fit's last step: always recorded


@pytest.fixture(autouse=True)
def no_plugin_variables(monkeypatch):
    """In-process Trainers below must not pick up the variables from the shell running the tests."""
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _declared_entry_points(group: str = GROUP) -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][group]


def _env(tmp_path: Path, **variables: str) -> dict:
    site = tmp_path / "site"
    dist = site / "tick_lightning-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tick-lightning\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in _declared_entry_points(group).items())
        for group in (GROUP, PL_GROUP)))
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), OMP_NUM_THREADS="1", **variables)
    return env


def _run_script(tmp_path: Path, *args: str, timeout: int = 180, **variables: str):
    proc = subprocess.run([sys.executable, str(HERE / "plugin_script.py"), str(tmp_path / "out"), *args],
                          env=_env(tmp_path, **variables), capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return proc, results


def _steps(ticks_dir) -> list[int]:
    return sorted(int(s) for s in load_ticks(ticks_dir).step.unique())


# --------------------------------------------------------------------------- the entry point itself
def test_pyproject_registers_the_factory():
    (name, value), = _declared_entry_points().items()
    assert EntryPoint(name=name, value=value, group=GROUP).load() is callbacks_factory


def test_pyproject_registers_the_factory_for_pytorch_lightning():
    # the group name is the one pytorch_lightning's Trainer reads (its source, not our guess)
    import inspect

    from pytorch_lightning.trainer.connectors import callback_connector

    assert f'_load_external_callbacks("{PL_GROUP}")' in inspect.getsource(callback_connector)
    (name, value), = _declared_entry_points(PL_GROUP).items()
    assert EntryPoint(name=name, value=value, group=PL_GROUP).load() is pytorch_lightning_callbacks_factory
    assert pytorch_lightning_callbacks_factory() == []  # no variable set (the autouse fixture)


def test_unset_returns_nothing_and_imports_nothing_heavy(tmp_path):
    code = ("import json, sys; from tick_lightning.entry import callbacks_factory as f; r = f(); "
            "print(json.dumps([r, sorted(m for m in sys.modules if m.startswith('tick_lightning')), "
            "'torch' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[], ["tick_lightning", "tick_lightning.entry"], False]


# --------------------------------------------------------------------------- an unmodified script
def _run_scenarios(root: Path, package: str, scenarios: dict) -> dict:
    """``plugin_script.py --scenarios``: the scripts of several tests, one after another in one process (the
    start-up of a Lightning process is most of each one's time); per scenario its ``RESULT``s and its stderr."""
    proc = subprocess.run([sys.executable, str(HERE / "plugin_script.py"), "--scenarios", json.dumps(scenarios),
                           "--package", package], env=_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {name: [] for name in scenarios}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            results[result["scenario"]].append(result)
    stderr, name = {n: "" for n in scenarios}, None
    for line in proc.stderr.splitlines(keepends=True):
        if line.startswith("SCENARIO "):
            name = line.split()[1]
        elif name is not None:
            stderr[name] += line
    return {n: (results[n], stderr[n]) for n in scenarios}


@pytest.fixture(scope="module")
def lightning_scripts(tmp_path_factory):
    """The ``lightning`` scripts of the tests below, run in one process; their outputs under ``root``."""
    root = tmp_path_factory.mktemp("lightning_scripts")
    own = root / "own"
    scenarios = {
        "environment": {"args": [str(root / "environment")],
                        "env": {"TICK_LIGHTNING": "3,every:4", "TICK_LIGHTNING_DIR": str(root / "ticks"),
                                "TICK_LIGHTNING_CONFIG": "states: [loss, weight, norm_input]",
                                "TICK_LIGHTNING_PATCH_NORMS": "1"}},
        "no_variables": {"args": [str(root / "no_variables")], "env": {}},
        "two_fits": {"args": [str(root / "two_fits"), "--fits", "2"], "env": {"TICK_LIGHTNING": "1"}},
        # the environment asks for exactly the script's callback: same schedule, same directory, so a plain
        # TickCallback from the environment would even collide with it in Lightning's state_key check
        "own_callback": {"args": [str(root / "own_callback"), "--own-callback", str(own)],
                         "env": {"TICK_LIGHTNING": "1", "TICK_LIGHTNING_DIR": str(own)}},
    }
    return root, _run_scenarios(root, "lightning", scenarios)


@pytest.fixture(scope="module")
def pytorch_lightning_scripts(tmp_path_factory):
    """The same for scripts of the standalone package (``import pytorch_lightning``)."""
    root = tmp_path_factory.mktemp("pytorch_lightning_scripts")
    scenarios = {
        "environment": {"args": [str(root / "environment"), "--checkpoint"],
                        "env": {"TICK_LIGHTNING": "every:5", "TICK_LIGHTNING_DIR": str(root / "ticks"),
                                "TICK_LIGHTNING_PATCH_NORMS": "1"}},
        "bare": {"args": [str(root / "bare"), "--checkpoint"], "env": {}},
        "own_callback": {"args": [str(root / "own_callback"), "--own-callback", str(root / "own")],
                         "env": {"TICK_LIGHTNING": "1"}},
    }
    return root, _run_scenarios(root, "pytorch_lightning", scenarios)


def test_script_records_ticks_from_the_environment(lightning_scripts):
    root, runs = lightning_scripts
    (result,), _ = runs["environment"]
    ticks = root / "ticks"
    assert result["callbacks"].count("EnvironmentTickCallback") == 1
    assert _steps(ticks) == sorted({3, LAST} | set(range(0, SCRIPT_STEPS, 4)))
    df = load_ticks(ticks)
    assert set(df.state) == {"loss", "weight", "norm_input"}
    # TICK_LIGHTNING_PATCH_NORMS=1: the precision plugin patched the script's LayerNorm, which fed norm_input
    assert result["precision_plugin"] == "NormPatchPrecision"
    assert result["norm_class"].startswith("tick_lightning.norms.")
    assert set(df[df.state == "norm_input"].name) == {"net.1"}


def _checkpoint_weights(path: str) -> dict:
    return torch.load(path, weights_only=False)["state_dict"]


def test_pytorch_lightning_script_records_ticks_and_checkpoints_the_same_weights(pytorch_lightning_scripts):
    """A script of the standalone package (``import pytorch_lightning``) gets the environment's ticks too."""
    root, runs = pytorch_lightning_scripts
    (result,), _ = runs["environment"]
    assert result["callbacks"].count("EnvironmentTickCallback") == 1
    assert all(result["package_callbacks"])  # every callback is a pytorch_lightning.Callback
    assert _steps(root / "ticks") == [0, 5, LAST]
    assert result["precision_plugin"] == "NormPatchPrecision" and result["norm_class"].startswith("tick_lightning.")
    # observing changes nothing that is trained: the same weights as the same script without the variables
    (bare,), _ = runs["bare"]
    assert not any("Tick" in name for name in bare["callbacks"])
    ticked, plain = _checkpoint_weights(result["checkpoint"]), _checkpoint_weights(bare["checkpoint"])
    assert ticked.keys() == plain.keys()
    for key in plain:  # fp32 both: the patched LayerNorm computes the same in fp32 (1 thread, same order)
        torch.testing.assert_close(ticked[key], plain[key], rtol=0, atol=1e-6, msg=key)
    state = torch.load(result["checkpoint"], weights_only=False)["callbacks"]
    assert any(key.startswith("EnvironmentTickCallback") for key in state)  # resumable like under lightning


def test_pytorch_lightning_script_keeps_its_own_tick_callback(pytorch_lightning_scripts):
    root, runs = pytorch_lightning_scripts
    (result,), _ = runs["own_callback"]
    assert [n for n in result["callbacks"] if "Tick" in n] == ["TickCallback"] and all(result["package_callbacks"])
    assert _steps(root / "own") == [0, LAST]


def test_script_without_variables_records_nothing(lightning_scripts):
    root, runs = lightning_scripts
    (result,), _ = runs["no_variables"]
    assert not any("Tick" in name for name in result["callbacks"])
    assert result["precision_plugin"] == "Precision" and result["norm_class"] == "torch.nn.modules.normalization.LayerNorm"
    assert not list((root / "no_variables").rglob("ticks"))


def test_each_trainer_gets_its_own_callback(lightning_scripts):
    _, runs = lightning_scripts
    results, _ = runs["two_fits"]
    ids = [r["callback_ids"][r["callbacks"].index("EnvironmentTickCallback")] for r in results]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert results[0]["log_dir"] != results[1]["log_dir"]
    for r in results:  # TICK_LIGHTNING=1: TickCallback's default schedule (every:100) into <log_dir>/ticks
        assert _steps(Path(r["log_dir"]) / "ticks") == [0, LAST]


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_bad_value_is_refused_in_one_line_at_trainer_construction(tmp_path, package):
    proc, results = _run_script(tmp_path, "--package", package, TICK_LIGHTNING="evry:5")
    assert proc.returncode == 1 and results == []
    # the whole output after the script's own seed_everything line: one line, no traceback through Trainer(...)
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.strip().splitlines() if line != "Seed set to 0"] == [
        "TICK_LIGHTNING='evry:5' is not valid: Malformed tick schedule term 'evry:5' (did you mean 'every:5'?); "
        "valid terms: every:N, epoch, "
        "epoch:N, log:N, frac:F, nonfinite, spike:K, none, <step> (TICK_LIGHTNING=1 means the default schedule, "
        "0 means off)."]
    assert not list((tmp_path / "out").rglob("ticks"))


def test_bad_value_is_still_an_exception_in_process():
    # a script that builds Trainers in `try` (or a notebook) catches it like Lightning's own ValueErrors
    with pytest.raises(ValueError, match="TICK_LIGHTNING='evry:5'"):
        callbacks_from_environment({"TICK_LIGHTNING": "evry:5"})
    try:
        callbacks_from_environment({"TICK_LIGHTNING": "evry:5"})
    except Exception as err:  # noqa: BLE001 - the point: `except Exception` is enough
        assert isinstance(err, SystemExit) and err.code == str(err)


def test_no_second_callback_when_the_script_has_its_own(lightning_scripts):
    root, runs = lightning_scripts
    (result,), stderr = runs["own_callback"]
    own = root / "own"
    assert [n for n in result["callbacks"] if "Tick" in n] == ["TickCallback"]
    assert "the Trainer already has TickCallback; TICK_LIGHTNING adds no second one" in stderr
    assert not any("adds no second one" in err for name, (_, err) in runs.items() if name != "own_callback")
    df = load_ticks(own)
    assert _steps(own) == [0, LAST]
    assert not df.duplicated(["step", "state", "name", "stat", "rank"]).any()  # one writer


def test_ddp_two_cpu_processes(tmp_path):
    ticks = tmp_path / "ticks"
    proc, (result,) = _run_script(tmp_path, "--ddp", "--max-steps", "7", timeout=240,
                                  TICK_LIGHTNING="0,2,every:3", TICK_LIGHTNING_DIR=str(ticks),
                                  TICK_LIGHTNING_CONFIG="{ranks: all, states: [loss, weight]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load_ticks(ticks)
    assert sorted(df["rank"].unique()) == [0, 1]
    for rank in (0, 1):  # every rank built its own callback from the inherited environment, deciding alike
        assert sorted(df[df["rank"] == rank].step.unique()) == [0, 2, 3, 6]
    weights = df[df.state == "weight"].pivot_table(index=["step", "name", "stat"], columns="rank", values="value")
    assert (weights[0] - weights[1]).abs().max() < 1e-6  # DDP-replicated weights


# --------------------------------------------------------------------------- reading the variables
@pytest.mark.parametrize("environ, expected", [
    ({"TICK_LIGHTNING": "every:x"}, ["TICK_LIGHTNING='every:x'", "every:N"]),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "states: [bogus]"},
     ["TICK_LIGHTNING_CONFIG=", "bogus", "valid states: loss"]),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "statez: [loss]"}, ["statez", "valid keys: ticks, states"]),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "patch_norms: maybe"}, ["patch_norms", "maybe"]),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG":
      "renorm: [{class_path: tick_lightning.Renorm, init_args: {target: linear, method: bogus}}]"},
     ["Renorm method 'bogus' is unknown; valid methods: layernorm"]),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "[1, 2]"}, ["expected a mapping", "valid keys"]),
    ({"TICK_LIGHTNING": "every:3", "TICK_LIGHTNING_CONFIG": "ticks: every:5"}, ["'ticks'", "one place"]),
    ({"TICK_LIGHTNING_PATCH_NORMS": "maybe"}, ["TICK_LIGHTNING_PATCH_NORMS='maybe'", "1, true"]),
    ({"TICK_LIGHTNING_DIR": "/tmp/x"}, ["TICK_LIGHTNING_DIR is set but TICK_LIGHTNING is not"]),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_DIR": " "}, ["TICK_LIGHTNING_DIR=' '"]),
])
def test_bad_values_name_variable_value_and_choices(environ, expected):
    with pytest.raises(PluginEnvironmentError) as info:
        callbacks_from_environment(environ)
    message = str(info.value)
    assert "\n" not in message and ".;" not in message and message.endswith(".")
    for part in expected:
        assert part in message


def test_config_builds_any_tick_callback_argument(tmp_path):
    config = tmp_path / "ticks.yaml"
    config.write_text("states: [loss, weight]\nstate_ticks: {weight: 'every:5'}\nselect: linear\nranks: all\n"
                      "renorm:\n  - class_path: tick_lightning.Renorm\n    init_args: {target: linear, method: unit}\n")
    (cb,) = callbacks_from_environment({"TICK_LIGHTNING": "every:2", "TICK_LIGHTNING_CONFIG": str(config)})
    assert isinstance(cb, EnvironmentTickCallback)
    assert str(cb.schedule) == "every:2" and cb.states == ("loss", "weight", "renorm")
    assert str(cb.state_schedules["weight"]) == "every:5" and cb.select == "linear" and cb.ranks == "all"
    assert cb.renorm_specs == [Renorm("linear", method="unit")]
    (inline,) = callbacks_from_environment({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "ticks: 'every:7'"})
    assert str(inline.schedule) == "every:7"  # TICK_LIGHTNING=1 leaves the schedule to the config


def test_off_values_and_fresh_objects():
    assert callbacks_from_environment({}) == [] and callbacks_from_environment({"TICK_LIGHTNING": "0"}) == []
    first, second = (callbacks_from_environment({"TICK_LIGHTNING": "1"})[0] for _ in range(2))
    assert first is not second and str(first.schedule) == str(TickCallback().schedule)


# --------------------------------------------------------------------------- NormPatchPrecision
class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def _fit(root, model, **trainer_kwargs):
    recorder = LossRecorder()
    trainer = tiny.trainer(root, max_steps=3, callbacks=[recorder], **trainer_kwargs)
    module = tiny.HFClassifier(model)
    trainer.fit(module, tiny.loader(tiny.token_dataset(24), 8))
    return trainer, module, torch.stack(recorder.losses)


def test_precision_plugin_matches_patch_norms_plus_mixed_precision(tmp_path):
    reference = tiny.tiny_bert()
    patch_norms(reference)
    _, ref_module, ref_losses = _fit(tmp_path / "ref", reference, precision="bf16-mixed")
    plugin = NormPatchPrecision("bf16-mixed", device="cpu")
    _, module, losses = _fit(tmp_path / "plugin", tiny.tiny_bert(), plugins=[plugin])

    norms = [m for n, m in module.model.named_modules() if n.endswith("LayerNorm")]
    assert norms and all(is_patched(m) for m in norms) and len(plugin.report.patched) == len(norms)
    # the same operations in the same order on one CPU thread: bit-identical, so the tolerance is zero
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    for (name, p), (_, q) in zip(module.named_parameters(), ref_module.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    # and autocast really was on: the same patched model in fp32 gives other losses
    fp32 = tiny.tiny_bert()
    patch_norms(fp32)
    _, _, fp32_losses = _fit(tmp_path / "fp32", fp32, precision="32-true")
    assert (fp32_losses - losses).abs().max() > 1e-6  # bf16 rounding (~1e-5 here); fp32 reruns are bit-identical


def test_checkpoint_loads_into_an_unpatched_model(tmp_path):
    trainer, module, _ = _fit(tmp_path, tiny.tiny_bert(), plugins=[NormPatchPrecision("bf16-mixed", device="cpu")])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    fresh = tiny.tiny_bert()
    assert not any(is_patched(m) for m in fresh.modules())
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    ids, mask, _ = tiny.token_dataset(8, seed=1).tensors
    with torch.no_grad():
        trained = module.model.eval()(input_ids=ids, attention_mask=mask).logits
        loaded = fresh.eval()(input_ids=ids, attention_mask=mask).logits
        untrained = tiny.tiny_bert().eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)  # fp32: patched vs original norm code
    assert not torch.allclose(untrained, trained, atol=1e-4)  # the checkpoint carried the training


class BuiltInConfigureModel(L.LightningModule):
    """Layers that exist only from configure_model on: a callback's setup (earlier) cannot patch them."""

    def configure_model(self):
        if not hasattr(self, "net"):
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_convert_module_patches_models_built_in_configure_model(tmp_path):
    module = BuiltInConfigureModel()
    trainer = tiny.trainer(tmp_path, max_steps=1, plugins=[NormPatchPrecision("32-true")])
    trainer.fit(module, tiny.loader(torch.utils.data.TensorDataset(torch.randn(8, 4)), 4))
    assert is_patched(module.net[1]) and trainer.precision == "32-true"
    trainer.validate(module, tiny.loader(torch.utils.data.TensorDataset(torch.randn(8, 4)), 4))  # converts again
    assert trainer.precision_plugin.report.patched[0].name == "net.1"


def test_precision_plugin_from_lightning_cli(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    cli = LightningCLI(BoringModel, BoringDataModule, run=False, save_config_callback=None, args=[
        "--trainer.plugins=tick_lightning.NormPatchPrecision", "--trainer.plugins.precision=bf16-mixed",
        "--trainer.plugins.device=cpu", "--trainer.accelerator=cpu", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}"])
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, NormPatchPrecision) and isinstance(plugin.wrapped, MixedPrecision)
    assert (cli.trainer.precision, plugin.device) == ("bf16-mixed", "cpu")


def test_precision_plugin_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"precision='bf16' is not supported; choose one of 32-true"):
        NormPatchPrecision("bf16")
    with pytest.raises(ValueError, match=r"kernel='triton' is unknown; valid choices: auto, torch"):
        NormPatchPrecision("32-true", kernel="triton")


def test_precision_plugin_repr_names_its_arguments():
    assert repr(NormPatchPrecision("bf16-mixed", device="cpu")) == "NormPatchPrecision(precision='bf16-mixed', device='cpu')"
    assert repr(NormPatchPrecision("32-true", select="norm*")) == "NormPatchPrecision(precision='32-true', select='norm*')"
    assert repr(NormPatchPrecision(MixedPrecision("16-mixed", "cpu"))) == \
        "NormPatchPrecision(MixedPrecision, precision='16-mixed')"
    # where users meet it: Lightning's own refusal of two precisions, one line without an object address
    with pytest.raises(ValueError) as info:
        L.Trainer(precision="bf16-mixed", plugins=[NormPatchPrecision("bf16-mixed", device="cpu")])
    assert str(info.value) == ("Received both `precision=bf16-mixed` and `plugins=NormPatchPrecision("
                               "precision='bf16-mixed', device='cpu')`. Choose one.")


def test_tick_callback_through_lightning_cli_flags(tmp_path):
    """The documented LightningCLI route (README, docs/getting-started.md#with-lightningcli), end to end."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    ticks = tmp_path / "ticks"
    cli = LightningCLI(BoringModel, BoringDataModule, save_config_callback=None, args=[
        "fit", "--trainer.callbacks+=tick_lightning.TickCallback", "--trainer.callbacks.ticks=every:5",
        f"--trainer.callbacks.dirpath={ticks}", "--trainer.max_steps=7", "--trainer.accelerator=cpu",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    assert [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, TickCallback)] == [TickCallback]
    assert _steps(ticks) == [0, 5, 6]  # 6: the last of 7 steps



@pytest.mark.parametrize("flag, value, cause", [
    ("ticks", "evry:5", "Malformed tick schedule term 'evry:5' (did you mean 'every:5'?); valid terms: every:N, "
                        "epoch, epoch:N, log:N, frac:F, nonfinite, spike:K, none, <step>."),
    ("state_ticks", "{weight: 'every:x'}", "Tick schedule term 'every:x': 'x' is not an integer; expected a "
                                           "positive integer such as 'every:10'."),
    ("renorm", "[{target: linear, method: bogus}]", "Renorm method 'bogus' is unknown; valid methods: layernorm, "
                                                    "unit, center."),
    ("ranks", "every", "ranks='every' is not valid; choose one of ('zero', 'all')."),
    ("states", "[loss, gard]", f"Unknown tick state(s) ['gard']; valid states: {', '.join(STATES)}."),
    ("dense", "[loss, weights]", "dense=['loss', 'weights'] has unknown dense entry ['weights']; valid: True, False "
                                 "or a list of loss, grad_norm, update_norm."),
    ("flight_window", "1", "flight_window=1 is not valid; pass an integer in [2, 16384] (steps held on the device)."),
])
def test_bad_value_through_lightning_cli_is_refused_while_parsing(capsys, tmp_path, flag, value, cause):
    """Through a plain ``LightningCLI``, a bad value of any argument is a parse error (exit status 2, jsonargparse's
    report with the schedule's, Renorm's or TickConfig's own sentence on one line of it), not an exception out of
    ``TickCallback(...)`` at instantiation (a traceback of a hundred lines), and nothing is trained or written."""
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(BoringModel, BoringDataModule, save_config_callback=None, args=[
            "fit", "--trainer.callbacks+=tick_lightning.TickCallback", f"--trainer.callbacks.{flag}={value}",
            "--trainer.max_steps=2", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert any(line.strip().endswith(cause) for line in err.splitlines()), err[-3000:]
    assert not (tmp_path / "out").exists()


def test_bad_schedule_in_a_users_own_lightning_cli_script_prints_no_traceback(tmp_path):
    """The same as a user meets it: their own script, run as a program."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text("from lightning.pytorch.cli import LightningCLI\n"
                      "from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel\n"
                      "LightningCLI(BoringModel, BoringDataModule, save_config_callback=None)\n")
    proc = subprocess.run([sys.executable, str(script), "fit", "--trainer.callbacks+=tick_lightning.TickCallback",
                           "--trainer.callbacks.ticks=evry:5", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
                           f"--trainer.default_root_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Not of type Ticks: Malformed tick schedule term 'evry:5' (did you mean 'every:5'?); valid terms:" \
        in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_value_in_the_config_variable_names_its_choices_not_the_keys():
    with pytest.raises(PluginEnvironmentError) as info:
        callbacks_from_environment({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "{ranks: every}"})
    assert str(info.value) == ("TICK_LIGHTNING_CONFIG='{ranks: every}' is not valid: ranks='every' is not valid; "
                               "choose one of ('zero', 'all').")


@pytest.mark.parametrize("config, cause", [
    ("{select: nomatch}", "Parameter selector 'nomatch' matches nothing"),
    ("{renorm: [{target: nomatch, method: unit}]}", "Renorm #0 (target='nomatch'): Parameter selector 'nomatch' "
                                                    "matches nothing"),
])
def test_a_config_that_does_not_fit_the_model_is_one_line_at_fit_start(tmp_path, config, cause):
    """What needs the model is known at fit start: still the variable's one line (no traceback when uncaught),
    before anything is recorded."""
    (callback,) = callbacks_from_environment({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": config,
                                              "TICK_LIGHTNING_DIR": str(tmp_path / "ticks")})
    trainer = tiny.trainer(tmp_path, callbacks=[callback], max_steps=2)
    with pytest.raises(PluginEnvironmentError) as info:
        trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(16)))
    assert str(info.value).startswith("TICK_LIGHTNING_CONFIG does not fit this model: " + cause), info.value
    assert "\n" not in str(info.value) and not (tmp_path / "ticks").exists()


@pytest.mark.parametrize("environ, line", [
    ({"TICK_LIGHTNING": " "}, "TICK_LIGHTNING=' ' is not valid: a blank value; set TICK_LIGHTNING=1 (the default "
                              "schedule), 0 (off) or a schedule such as every:100."),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_DIR": "/proc/nope/ticks"},
     "TICK_LIGHTNING_DIR='/proc/nope/ticks' cannot hold the records: '/proc' does not allow creating "
     "'nope'; give a directory you can write to."),
    ({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "configs/ticks.yaml"},
     "TICK_LIGHTNING_CONFIG='configs/ticks.yaml' names a file that does not exist; give an existing YAML file "
     "or inline YAML such as '{states: [loss, grad]}'."),
])
def test_variables_that_failed_late_or_silently_are_one_line_at_trainer_creation(environ, line):
    """Each was accepted: a blank switch turned recording off without a word, an impossible directory died at
    ``on_train_start`` in four chained errors that never named the variable, a missing file was read as YAML."""
    with pytest.raises(PluginEnvironmentError) as info:
        callbacks_from_environment(environ)
    assert str(info.value) == line
