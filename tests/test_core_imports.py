"""The recorder's core and the non-Lightning adapters import nothing of Lightning (nor the core the Trainer): each
imported in a fresh interpreter whose import system refuses those packages."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        blocked = {blocked!r}
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
import {module}
print("imported", sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
"""


@pytest.mark.parametrize("module, blocked", [
    ("tick_lightning.core", ("lightning", "pytorch_lightning", "transformers.trainer")),
    ("tick_lightning.loop", ("lightning", "pytorch_lightning", "transformers.trainer")),
    ("tick_lightning.hf", ("lightning", "pytorch_lightning")),
])
def test_the_core_and_the_adapters_import_without_lightning(module, blocked):
    done = subprocess.run([sys.executable, "-c", BLOCK.format(module=module, blocked=blocked)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "imported []"


def test_the_block_would_catch_an_import_of_lightning():
    """The instrument itself: the Lightning callback does import Lightning, and is refused."""
    done = subprocess.run([sys.executable, "-c", BLOCK.format(module="tick_lightning.callback", blocked=("lightning",))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "blocked: lightning" in done.stderr
