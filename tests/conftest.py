import os
import sys
from pathlib import Path

import pytest

# Tests never reach the hub; tiny models are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # `import tiny`

#: Modules that launch several processes through Lightning's launchers or torch.distributed.run (each picks a
#: localhost port): under pytest-xdist they run in one worker, one after another, never two launches at once.
#: (gloo_spawn tests rendezvous through a file and may run anywhere.)
LAUNCHERS = {"test_distributed", "test_guard_dist", "test_hf_trainer", "test_plugin", "test_recipes_fsdp2", "test_recipes_strategies", "test_renorm_dist",
             "test_renorm_resolve", "test_report", "test_strategies"}

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on a 2-core machine: one intra-op thread each (and in the processes they launch), or the
    # workers' thread pools fight over the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if item.module.__name__ in LAUNCHERS:
            item.add_marker(pytest.mark.xdist_group("launchers"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops run ~10x faster on one intra-op thread than on two on a loaded 2-core machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` in modules of many tiny-tensor tests.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
