"""The recipes' command line: ``LightningCLI`` with a run directory, the ``tick`` and ``checkpoint`` groups,
automatic precision, validation before training, and after ``fit`` the metrics, the exported model and the report.

A recipe (``recipes/<name>.py``) defines a LightningModule (with ``build(datamodule)``, ``model`` and
``export_model(path)``) and a ``LightningDataModule`` whose ``__init__`` arguments are its config, and a
``cli(args)`` that calls :func:`run_recipe`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recipes._shared.checkpointing import CheckpointConfig, RunCheckpoint
from recipes._shared.config import TickConfig, make_tick_callback
from recipes._shared.errors import RecipeError, check_config_files
from recipes._shared.precision import auto_precision
from recipes._shared.run_dir import RUN_DIR_ENV, check_ckpt_path, resolve_run_dir
from recipes._shared.sharding import builds_on_meta, end_process_group, full_state_dict
from recipes._shared.summary import make_report, print_summary
from tick_lightning.callback import TickCallback
from tick_lightning.config import parse_error_line


def _did_you_mean(parser, line: str) -> str:
    """`` (did you mean --trainer.max_steps?)`` for each unrecognized ``--flag`` close to one the parser knows."""
    import difflib
    import re

    if "nrecognized arguments" not in line:
        return ""
    known = set()
    for p in [parser, *getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {}).values()]:
        known.update(o for o in getattr(p, "_option_string_actions", {}) if o.startswith("--"))
    hints = []
    for flag in re.findall(r"(--[\w.]+)", line.partition("rguments:")[2]):
        close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.8)
        if close:
            hints.append(close[0])
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


class RecipeCLI(LightningCLI):
    """``LightningCLI`` with a run directory, a ``tick`` group, automatic precision, validation before training,
    and after ``fit``: ``metrics.json``, ``model/`` (save_pretrained) and the tick report.

    Example:
        >>> # in recipes/<name>.py
        >>> def main(args=None):                                   # doctest: +SKIP
        ...     RecipeCLI(MyModule, MyData, recipe="my_recipe", args=args)
    """

    def __init__(self, model_class, datamodule_class, *, recipe: str, links: Sequence[tuple] = (),
                 default_max_epochs: int = 1, **kwargs: Any) -> None:
        self.recipe = recipe
        self.links = list(links)
        self.default_max_epochs = default_max_epochs
        self.run_dir: Optional[Path] = None
        self._created_run_dir = False
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_callback", None)  # config.yaml is written by before_fit, once validated
        # parse errors: one line (parse_arguments); no prefix matching (--trainer.max_step was taken as max_steps)
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False, "allow_abbrev": False})
        super().__init__(model_class, datamodule_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help=f"where everything of the run goes (default runs/{self.recipe}-<timestamp>)")
        parser.add_dataclass_arguments(TickConfig, "tick")
        parser.add_dataclass_arguments(CheckpointConfig, "checkpoint")
        parser.set_defaults({"trainer.precision": auto_precision(), "trainer.log_every_n_steps": 10})
        for link in self.links:
            parser.link_arguments(*link)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # run_recipe passes sys.argv (with "fit" prepended) explicitly; skip LightningCLI's both-given warning.
        # A bad value (--tick.ticks=evry:5, a --trainer.callbacks TickCallback's) is refused here, while parsing,
        # as one line: jsonargparse's own report is a usage block and a dozen lines of union subtypes
        try:
            self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)
        except ArgumentError as err:
            line = _outside_literals(str(err)) or parse_error_line(err)
            raise RecipeError(f"bad value in the config: {line}{_did_you_mean(parser, line)}") from err
        # the run directory is fixed here, before anything is built, and written back into the config, so that
        # config.yaml names it and `--ckpt_path last` finds this directory's checkpoints
        sub = self.config.get("subcommand")
        if sub is None:
            return
        cfg = self.config[sub]
        if sub == "fit" and cfg.get("trainer.max_steps") == 0:
            raise RecipeError("--trainer.max_steps=0 trains nothing; pass a positive number of steps, or -1 to train "
                              "for --trainer.max_epochs.")
        self.run_dir = resolve_run_dir(self.recipe, cfg.get("run_dir"), cfg.get("trainer.default_root_dir"),
                                       cfg.get("ckpt_path"))
        cfg["run_dir"] = str(self.run_dir)
        check_ckpt_path(cfg.get("ckpt_path"), self.run_dir)

    def instantiate_classes(self) -> None:
        # a class that refuses its arguments (the ``tick`` group's TickConfig checks, --tick.ranks=every) surfaces
        # from jsonargparse as ~100 lines ending "Does not validate against any of the Union subtypes"; the class's
        # own error is the first link of the chain, and the one line a user needs
        try:
            super().instantiate_classes()
        except ValueError as err:
            raise RecipeError(f"bad value in the config: {' '.join(str(_first_cause(err)).split())}") from err

    # -- trainer with the run directory
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        os.environ[RUN_DIR_ENV] = str(self.run_dir.resolve())  # for the ranks a DDP launch starts (see default_run_dir)
        self._created_run_dir = not self.run_dir.exists()
        cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.pop("callbacks", None) or [])
        own = cfg.get("callbacks")
        callbacks += ([] if own is None else own if isinstance(own, list) else [own])
        if cfg.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks):
            ckpt_cfg = self._get(self.config_init, "checkpoint")
            ckpt_cfg = ckpt_cfg if isinstance(ckpt_cfg, CheckpointConfig) else CheckpointConfig(**(ckpt_cfg or {}))
            callbacks.append(RunCheckpoint(self.run_dir / "checkpoints", ckpt_cfg.every_n_train_steps,
                                           ckpt_cfg.train_time_interval))
        tick_cfg = self._get(self.config_init, "tick")
        if self.subcommand == "fit" and tick_cfg is not None:
            if isinstance(tick_cfg, dict):
                tick_cfg = TickConfig(**tick_cfg)
            try:
                tick = make_tick_callback(tick_cfg, self.run_dir / "ticks")
            except ValueError as err:  # TickConfig checked the arguments; what is left is the dirpath's
                raise RecipeError(f"bad --tick option: {err}") from err
            if tick is not None:
                callbacks.append(tick)
        if cfg.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(self.run_dir)
        if cfg.get("logger") in (None, True):
            from lightning.pytorch.loggers import CSVLogger

            kwargs["logger"] = CSVLogger(save_dir=str(self.run_dir), name="logs")
        if cfg.get("max_epochs") is None:  # an explicit max_steps / max_time is not capped by the recipe's epochs
            bounded = cfg.get("max_steps", -1) not in (None, -1) or cfg.get("max_time") is not None
            kwargs["max_epochs"] = -1 if bounded else self.default_max_epochs
        kwargs["callbacks"] = callbacks
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:  # Lightning's checks of --trainer.*
            raise RecipeError(f"bad --trainer option: {err}") from err

    # -- validation before training
    def _prepare(self, stage: str) -> None:
        """Load the data and build the model now, so bad input fails before anything is written."""
        try:
            self.datamodule.prepare_data()
            self.datamodule.setup(stage)
            if getattr(self.model, "model", None) is None:
                self.model.build_on_meta = builds_on_meta(self.trainer.strategy)
                self.model.build(self.datamodule)
            for callback in self.trainer.callbacks:  # selectors against the built model, not at fit start
                if isinstance(callback, TickCallback):
                    try:
                        callback.check_selection(self.model)
                    except ValueError as err:  # SelectionError, RenormError
                        raise RecipeError(f"bad --tick option: {err}") from None
        except BaseException:
            if self._created_run_dir and self.run_dir is not None and self.run_dir.exists():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def before_fit(self) -> None:
        self._prepare("fit")
        if self.trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            parser = self._parser(self.subcommand)
            parser.save(self.config[self.subcommand], str(self.run_dir / "config.yaml"), skip_none=False,
                        overwrite=True, multifile=False)

    def before_validate(self) -> None:
        self._prepare("validate")

    def before_test(self) -> None:
        self._prepare("test")

    def before_predict(self) -> None:
        self._prepare("predict")

    # -- after training: metrics, model, report
    def after_fit(self) -> None:
        trainer, dm = self.trainer, self.datamodule
        if trainer.interrupted:
            return
        metrics: dict[str, Any] = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
        if dm.val_dataloader() is not None:
            out = trainer.validate(self.model, datamodule=dm, verbose=False)
            metrics["validate"] = {k: float(v) for k, v in (out[0] if out else {}).items()}
        if getattr(dm, "has_test", lambda: False)():
            out = trainer.test(self.model, datamodule=dm, verbose=False)
            metrics["test"] = {k: float(v) for k, v in (out[0] if out else {}).items()}
        gathered = full_state_dict(self.model.model) if self.model.model is not None else None  # every rank
        if not trainer.is_global_zero:
            return
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self.model.export_model(self.run_dir / "model", **({} if gathered is None else {"state_dict": gathered}))
        report_path = make_report(self.run_dir)
        print_summary(self.run_dir, metrics, report_path)


def _outside_literals(report: str) -> Optional[str]:
    """One line for jsonargparse's report of a value outside a union of ``Literal`` types (Lightning's
    ``--trainer.precision``: a dozen lines that list each subtype), or ``None`` for any other report.

    Example:
        >>> print(_outside_literals('Parser key "trainer.precision":\\n  Does not validate against any of the Union '
        ...       "subtypes\\n  Subtypes: [typing.Literal[64, 32], typing.Literal['32-true', 'bf16-mixed'], "
        ...       "<class 'NoneType'>]\\n  Errors:\\n    - Expected a <class 'int'>\\n  Given value: bf17"))
        --trainer.precision='bf17' is not valid; choose one of 64, 32, 32-true, bf16-mixed, null.
    """
    key = re.match(r'Parser key "([^"]+)"', report)
    subtypes = re.search(r"Subtypes: \[(.*)\]\s*$", report, re.MULTILINE)
    given = re.search(r"Given value: (.*)\s*$", report)
    if key is None or subtypes is None or given is None:
        return None
    literals = re.findall(r"typing\.Literal\[([^\]]*)\]", subtypes.group(1))
    rest = re.sub(r"typing\.Literal\[[^\]]*\]|<class 'NoneType'>|[,\s]", "", subtypes.group(1))
    if not literals or rest:
        return None
    try:
        values = [v for inner in literals for v in ast.literal_eval(f"({inner},)")]
    except (SyntaxError, ValueError):
        return None
    choices = dict.fromkeys(str(v) for v in values)  # 64 and '64' are one choice on a command line
    if "<class 'NoneType'>" in subtypes.group(1):
        choices["null"] = None
    return f"--{key.group(1)}={given.group(1).strip()!r} is not valid; choose one of {', '.join(choices)}."


def _first_cause(err: BaseException) -> BaseException:
    """The innermost ``__cause__`` of ``err`` (jsonargparse chains a union's first subtype error as the cause)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def run_recipe(model_class, datamodule_class, recipe: str, args: Optional[list[str]] = None,
               links: Sequence[tuple] = (), **kwargs: Any) -> RecipeCLI:
    """Run a recipe's CLI (``fit`` by default when ``args`` has no subcommand).

    Example:
        >>> run_recipe(TextClassifier, TextData, "text_classification", ["--trainer.max_steps=5"])  # doctest: +SKIP
    """
    args = list(sys.argv[1:] if args is None else args)
    check_config_files(args)
    subcommands = set(LightningCLI.subcommands())
    first = next((a for a in args if not a.startswith("-")), None)
    if not args or (first not in subcommands and args[0] not in ("-h", "--help")):
        args = ["fit", *args]
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    cli = RecipeCLI(model_class, datamodule_class, recipe=recipe, links=links, args=args, **kwargs)
    if not had_group:  # the run's own (a caller's group is the caller's to end)
        end_process_group()  # the run succeeded on every rank: nothing is left to communicate
    return cli
