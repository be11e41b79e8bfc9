"""``TickConfig``: the one place TickCallback's arguments are checked and derived; its fields are the
callback's signature (names, defaults), so LightningCLI / jsonargparse and the config cannot drift apart."""

import dataclasses
import inspect

import pytest

from tick_lightning import TickCallback
from tick_lightning.config import DEFAULT_STATES, TickConfig
from tick_lightning.records import STATES


def test_fields_are_the_callbacks_signature_with_its_defaults():
    params = {n: p.default for n, p in inspect.signature(TickCallback.__init__).parameters.items() if n != "self"}
    fields = {f.name: f.default for f in dataclasses.fields(TickConfig) if f.init}
    assert fields == params


def test_the_callback_reads_what_the_config_derived():
    cb = TickCallback(ticks="0,every:5", states=["loss", "grad"], state_ticks={"grad": "every:10"},
                      dense=False, flight=True)
    assert cb.config.chosen_states == cb.states == ("loss", "grad")
    assert cb.state_schedules["grad"].is_step_tick(10) and not cb.state_schedules["grad"].is_step_tick(5)
    assert cb.dense == () and cb.flight is None  # the default recorder steps aside without dense series
    assert TickConfig().chosen_states == DEFAULT_STATES


@pytest.mark.parametrize("kw, line", [
    ({"ranks": "every"}, "ranks='every' is not valid; choose one of ('zero', 'all')."),
    ({"dense": ["loss", "weights"]}, "dense=['loss', 'weights'] has unknown dense entry ['weights']; valid: True, "
                                     "False or a list of loss, grad_norm, update_norm."),
    ({"flight_window": 0}, "flight_window=0 is not valid; pass an integer in [2, 16384] (steps held on the device)."),
    ({"states": 5}, f"states=5 is not valid; pass a state name or a list of them: {', '.join(STATES)}."),
    ({"select": 3}, "select=3 is not valid; pass a glob over names or a kind (all, norm, attention, embedding, lora, "
                    "linear), a list of them, or None."),
    ({"activations": ["mlp", None]}, "activations=['mlp', None] is not valid; pass a glob over names or a kind (all, "
                                     "norm, attention, embedding, lora, linear), a list of them, or None."),
])
def test_each_bad_argument_is_one_line_naming_the_value_and_the_choices(kw, line):
    with pytest.raises(ValueError) as err:
        TickConfig(**kw)
    assert str(err.value) == line
    with pytest.raises(ValueError, match=line.split(";")[0].replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        TickCallback(**kw)  # the callback raises the config's error, unchanged


def test_a_schedule_is_checked_while_parsing_even_after_jsonargparse_read_a_type_checking_block(tmp_path, monkeypatch):
    """jsonargparse runs the ``if TYPE_CHECKING:`` blocks of the modules it resolves, and once one module imported
    ``TYPE_CHECKING`` from typing it matches that name in every module after it: ``Ticks`` must stay the checked
    type then (a recipe run with ``--trainer.callbacks+=...EMAWeightAveraging`` used to turn it into the type
    checkers' alias, and ``evry:5`` got past the parser)."""
    from jsonargparse import ArgumentError, ArgumentParser

    from tick_lightning.config import parse_error_line

    (tmp_path / "reads_type_checking.py").write_text(
        "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        "    from typing import Any\n\n\nclass Thing:\n    def __init__(self, x: Any = 1):\n        self.x = x\n")
    monkeypatch.syspath_prepend(tmp_path)
    import reads_type_checking

    ArgumentParser().add_class_arguments(reads_type_checking.Thing, "thing")

    @dataclasses.dataclass
    class Fresh(TickConfig):  # a class jsonargparse has not resolved yet: it reads tick_lightning.config again
        pass

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Fresh, "tick")
    with pytest.raises(ArgumentError) as info:
        parser.parse_args(["--tick.ticks=evry:5"])
    assert parse_error_line(info.value, group="tick") == (
        "ticks: Malformed tick schedule term 'evry:5' (did you mean 'every:5'?); valid terms: every:N, epoch, "
        "epoch:N, log:N, frac:F, nonfinite, spike:K, none, <step>.")


def _bad_values(tmp_path):
    """One bad value per argument a command line or YAML can give (rules between two arguments, such as
    ``flight`` without ``dense``, are checked when the callback is made)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return [("ticks", "evry:5"), ("states", ["loss", "gard"]), ("state_ticks", {"wieght": "every:5"}),
            ("state_ticks", "{weight:"),  # an unquoted shell value split in two
            ("state_ticks", {"weight": "every:x"}), ("ranks", "every"), ("dense", ["loss", "weights"]),
            ("flight", ["absmax"]), ("dense_flush_every", 0), ("flight_window", 1), ("dirpath", str(a_file))]


def test_every_argument_is_refused_while_parsing_with_the_configs_own_line(tmp_path):
    """What ``TickConfig`` says of a bad value from Python is what jsonargparse says of it from a command line or
    YAML (``LightningCLI``, ``TICK_LIGHTNING_CONFIG``, the recipes), while parsing: the callback is never made."""
    import yaml
    from jsonargparse import ArgumentError, ArgumentParser

    from tick_lightning.config import parse_error_line

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TickCallback, "tick", instantiate=False)
    for name, value in _bad_values(tmp_path):
        with pytest.raises(ValueError) as python:
            TickConfig(**{name: value})
        text = value if isinstance(value, str) else \
            yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        flag = f"--tick.{name}={text}"  # a string as a shell passes it
        with pytest.raises(ArgumentError) as parsed:
            parser.parse_args([flag])
        line = str(python.value)  # the key once: "ranks='every' is ...", "state_ticks: Tick schedule term ..."
        assert parse_error_line(parsed.value, group="tick") == (line if line.startswith(f"{name}=") else
                                                                f"{name}: {line}"), flag


def test_good_values_parse_to_what_the_config_takes(tmp_path):
    import yaml
    from jsonargparse import ArgumentParser

    good = {"ticks": "0,every:5", "states": ["loss", "weight"], "state_ticks": {"weight": "every:10"}, "ranks": "all",
            "dense": ["loss", "grad_norm", "update_norm"], "flight": ["update_norm"], "dense_flush_every": 8,
            "flight_window": 2, "dirpath": str(tmp_path / "new" / "ticks")}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TickCallback, "tick", instantiate=False)
    parsed = parser.parse_object({"tick": good}).tick
    for name, value in good.items():
        assert parsed[name] == value, name
    assert parser.parse_args(["--tick.dense=false", "--tick.flight=true"]).tick.dense is False
    cfg = TickConfig(**{name: parsed[name] for name in good})
    assert cfg.chosen_states == ("loss", "weight") and cfg.dense_series == ("loss", "grad_norm", "update_norm")
    assert yaml.safe_load(parser.dump(parser.parse_object({"tick": good}), skip_none=False)) == {"tick": {**TickConfig().arguments(),
                                                                                         **good}}


def test_the_callback_and_the_config_annotate_each_argument_alike():
    """jsonargparse reads ``TickCallback.__init__`` (LightningCLI) and ``TickConfig`` (the recipes): the same types."""
    import typing

    hints = typing.get_type_hints(TickCallback.__init__)
    config = typing.get_type_hints(TickConfig)
    assert {f.name: config[f.name] for f in dataclasses.fields(TickConfig) if f.init} == \
        {n: t for n, t in hints.items() if n != "return"}


@pytest.mark.parametrize("kw, line", [
    ({"flight_window": 10 ** 9}, "flight_window=1000000000 is not valid; pass an integer in [2, 16384] (steps held on "
                                 "the device)."),
    ({"dense_flush_every": 10 ** 9}, "dense_flush_every=1000000000 is not valid; pass an integer in [1, 65536] (steps)."),
    ({"dirpath": ""}, "dirpath='' is empty; pass a directory for the records (made if missing), or None for "
                      "<trainer.log_dir>/ticks."),
    ({"dirpath": 123}, "dirpath=123 is not valid; pass a directory path (a string or pathlib.Path), or None."),
    ({"patch_norms": "no"}, "patch_norms='no' is not valid; pass True or False."),
    ({"log_to_loggers": 1}, "log_to_loggers=1 is not valid; pass True or False."),
    ({"update_on_host": None}, "update_on_host=None is not valid; pass True or False."),
    ({"states": []}, "states=[] records no tick state; pass state names (e.g. ['loss', 'grad']), or None for the "
                     "defaults; the dense series and flight recorder have arguments of their own."),
])
def test_bad_values_that_were_accepted_are_one_line(kw, line):
    """Each was accepted before (and grew to 19 GB of host memory, wrote into the working directory, patched on a
    truthy string, or recorded nothing without a word)."""
    import tracemalloc

    from tick_lightning.config import ConfigError

    tracemalloc.start()
    with pytest.raises(ConfigError) as err:
        TickCallback(**kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(err.value) == line
    assert peak < 50 * 2 ** 20  # refused before anything is allocated


def test_log_select_that_matches_nothing_is_refused_at_fit_start(tmp_path):
    """It was silent: no series reached the loggers and nothing said why."""
    import tiny

    from tick_lightning.select import SelectionError

    callback = TickCallback(log_select="encoder.layer.*.nomatch", dirpath=tmp_path / "ticks")
    with pytest.raises(SelectionError, match=r"^log_select: .*'encoder.layer.\*.nomatch' matches nothing"):
        callback.check_selection(tiny.tiny_bert())
    trainer = tiny.trainer(tmp_path, callbacks=[callback], max_steps=2)
    with pytest.raises(SelectionError, match="^log_select: "):
        trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(16)))
    assert not (tmp_path / "ticks").exists()
