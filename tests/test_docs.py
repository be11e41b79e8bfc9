"""Every ```python block of README.md and docs/*.md runs: one test per file, its blocks in order in one
namespace, in a temporary working directory, offline (tests/conftest.py sets the HF offline variables).
Every docstring example (``>>>``) of the library and the recipes runs too, one test per module.

Use ```bash, ```yaml or ```text for anything that must not run; ``# doctest: +SKIP`` in a docstring.
"""

from __future__ import annotations

import doctest
import importlib
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([p for p in [ROOT / "README.md"] if p.exists()] + sorted((ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_block_extraction():
    text = "intro\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = x + 1\n")]


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_doc_examples_run(doc: Path, tmp_path, monkeypatch):
    blocks = python_blocks(doc.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{doc.name} has no python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": f"docs.{doc.stem}"}
    start = time.perf_counter()
    for line, code in blocks:
        where = f"{doc.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - executing our own documentation
        except Exception as err:
            raise AssertionError(f"python block at {where} failed: {type(err).__name__}: {err}") from err
    elapsed = time.perf_counter() - start
    print(f"{doc.name}: {len(blocks)} blocks in {elapsed:.1f} s")


MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for package in ("tick_lightning", "recipes") for p in (ROOT / package).rglob("*.py")
                 if p.name != "__main__.py")  # a __main__ runs its program when imported


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (above)"


def test_the_argument_table_is_the_signature():
    """docs/getting-started.md's table of TickCallback's arguments: every argument, in order, with its default."""
    import inspect

    from tick_lightning import TickCallback

    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    table = text.split("### Every argument", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    documented = [(name.strip().strip("`"), default.strip().strip("`")) for name, default in rows]
    signature = [(n, repr(p.default)) for n, p in inspect.signature(TickCallback.__init__).parameters.items()
                 if n != "self"]
    assert documented == [(n, d.replace("'", '"')) for n, d in signature]
