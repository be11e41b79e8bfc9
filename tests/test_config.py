"""``TickConfig``: the one place TickCallback's arguments are checked and derived; its fields are the
callback's signature (names, defaults), so LightningCLI / jsonargparse and the config cannot drift apart."""

import dataclasses
import inspect

import pytest

from tick_lightning import TickCallback
from tick_lightning.config import DEFAULT_STATES, TickConfig


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
    ({"flight_window": 0}, "flight_window=0 is not valid; pass an integer >= 2 (steps held on the device)."),
])
def test_each_bad_argument_is_one_line_naming_the_value_and_the_choices(kw, line):
    with pytest.raises(ValueError) as err:
        TickConfig(**kw)
    assert str(err.value) == line
    with pytest.raises(ValueError, match=line.split(";")[0].replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        TickCallback(**kw)  # the callback raises the config's error, unchanged
