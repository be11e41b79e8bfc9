"""The ``tick-lightning`` command: run a recipe, list recipes and configs, write a tick report.

It lives with the recipes (the library, ``tick_lightning``, never imports ``recipes``); ``report`` is the
library's own ``tick_lightning.reporting.main``, also reachable as ``python -m tick_lightning.reporting``.

Usage::

    tick-lightning run <recipe> [--config FILE] [LightningCLI overrides, e.g. --trainer.max_steps=20]
    tick-lightning run <recipe> validate --config FILE        # any LightningCLI subcommand; fit by default
    tick-lightning ls                                          # recipes and their shipped configs
    tick-lightning report <ticks dir> [options]                # see tick-lightning report --help

Example:
    >>> main(["ls"])  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path
from typing import Optional

from recipes import _registry
from tick_lightning.reporting import main as report_main

__all__ = ["main", "list_recipes", "recipes_dir"]

USAGE = """usage: tick-lightning {run,ls,report} ...

  run <recipe> [--config FILE] [overrides]   run a recipe (LightningCLI; 'fit' unless a subcommand is given)
  ls                                         list recipes and their shipped configs
  report <ticks dir> [options]               write the tick report (tick-lightning report --help)
"""


def recipes_dir() -> Path:
    """The folder of the recipes (``recipes/*.py`` and ``recipes/configs/*.yaml``)."""
    return Path(_registry.__file__).resolve().parent


def _header(path: Path) -> list[str]:
    """The leading comment block of a YAML config (its description and launch command, by convention)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def list_recipes() -> dict[str, list[Path]]:
    """``{recipe name: [shipped config paths]}`` from the recipe registry (no recipe code is imported).

    Example:
        >>> "text_classification" in list_recipes()
        True
    """
    return {name: _registry.configs(name) for name in _registry.RECIPES}


def _cmd_ls() -> int:
    recipes = list_recipes()
    for name, configs in recipes.items():
        print(name)
        print(f"    tick-lightning run {name}                     (offline default)")
        for cfg in configs:
            print(f"    {cfg.relative_to(recipes_dir().parent)}")
            for line in _header(cfg):  # the whole header: the sentence an offline user needs may be the last
                print(f"        {line}")
    return 0


def _cmd_run(args: list[str]) -> int:
    if not args or args[0].startswith("-"):
        print("usage: tick-lightning run <recipe> [--config FILE] [overrides]; recipes: "
              + ", ".join(list_recipes()), file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    recipes = list_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, list(recipes), n=3)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown recipe {name!r}; available recipes: {', '.join(recipes)}.{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(_registry.RECIPES[name])
    try:
        module.main(rest)  # a recipe's main prints bad input as one `error:` line and exits with 2
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0


def _cmd_report(args: list[str]) -> int:
    return int(report_main(args) or 0)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``tick-lightning``; returns the exit status.

    Example:
        >>> main(["run", "no_such_recipe"])  # doctest: +SKIP
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return _cmd_run(rest)
    if command == "ls":
        return _cmd_ls()
    if command == "report":
        return _cmd_report(rest)
    print(f"error: unknown command {command!r}; choose one of run, ls, report.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
