"""The instruments count exactly what they claim, on plain torch code (simulated accelerator on CPU, meta)."""

import doctest

import instruments
import numpy as np
import pytest
import torch
from instruments import HostTraffic, LiveBytes, load_module

pytestmark = pytest.mark.usefixtures("one_thread")


def traffic(fn, device="cpu"):
    with HostTraffic(device=device, scope=None) as t:
        fn()
    return t.syncs, t.h2d, t.d2h


x = torch.arange(6.0)


@pytest.mark.parametrize("case, expected", [
    # (syncs, h2d, d2h)
    (lambda: x.sum().item(), (1, 0, 0)),
    (lambda: bool(x.sum() > 0), (1, 0, 0)),
    (lambda: float(x[2]), (1, 0, 0)),
    (lambda: x if x.max() > 3 else None, (1, 0, 0)),
    (lambda: torch.tensor([1.0, 2.0], device="cpu"), (0, 1, 0)),
    (lambda: torch.tensor(3.0, device=x.device), (0, 1, 0)),
    (lambda: torch.as_tensor(np.ones(3), device="cpu"), (0, 1, 0)),
    (lambda: x.new_tensor([1.0]), (0, 1, 0)),
    (lambda: x.clone().__setitem__([0, 2], torch.zeros(2, device="cpu")), (0, 1, 0)),
    (lambda: x[[1, 3]], (0, 1, 0)),
    (lambda: x.clone().__setitem__(slice(0, 2), torch.tensor([5.0, 6.0])), (0, 1, 0)),  # a host value
    (lambda: torch.tensor([1.0, 2.0]).to(x.device), (0, 1, 0)),
    (lambda: x.clone().copy_(torch.ones(6)), (0, 1, 0)),
    (lambda: x.cpu(), (0, 0, 1)),
    (lambda: x.tolist(), (0, 0, 1)),
    (lambda: x.numpy(), (0, 0, 1)),
    (lambda: torch.empty(6).copy_(x), (0, 0, 1)),
    (lambda: x.cpu().tolist(), (0, 0, 1)),  # one copy; reading the host copy is free
    (lambda: x.cpu().double().numpy(), (0, 0, 1)),
    (lambda: float(x.cpu().sum()), (0, 0, 1)),  # computed from host tensors only: host
    (lambda: torch.tensor(2.0).item(), (0, 0, 0)),  # a host tensor (no device=): no sync
    # device work that moves nothing
    (lambda: torch.full((3,), float("nan"), device="cpu"), (0, 0, 0)),
    (lambda: x.clone().__setitem__(torch.arange(2, device="cpu"), 1.0), (0, 0, 0)),
    (lambda: torch.where(x > 2, x, torch.zeros_like(x)).to(x.device), (0, 0, 0)),
    (lambda: torch.stack([x.sum(), x.max()]).to("cpu"), (0, 0, 0)),  # simulated: .to(<the device>) stays
    (lambda: torch.linalg.vector_norm(x, 2), (0, 0, 0)),
])
def test_host_traffic_counts_plain_torch_code(case, expected):
    assert traffic(case) == expected


def test_meta_values_read_or_copied_are_counted_and_answered_with_zeros():
    m = torch.ones(4, 3, device="meta")
    with HostTraffic(device="meta", scope=None) as t:
        assert m.sum().item() == 0.0
        host = m.cpu()
        listed = m[0].tolist()
        torch.tensor([1.0], device="meta")  # meta is a device too: host data moved there
    assert host.device.type == "cpu" and host.shape == (4, 3) and listed == [0.0, 0.0, 0.0]
    assert (t.syncs, t.h2d, t.d2h) == (1, 1, 2)


def test_scope_keeps_only_events_below_code_from_that_directory(tmp_path):
    code = load_module(tmp_path / "scoped_code.py", "def read(t):\n    return t.sum().item()\n")
    with HostTraffic(device="cpu", scope=str(tmp_path)) as t:
        x.sum().item()  # outside the scope: not counted
        t.label = 7
        code.read(x)
    assert t.syncs == 1 and t.events[0].label == 7 and t.events[0].where.startswith("scoped_code.py:2")
    assert t.by_label() == {7: {"sync": 1, "h2d": 0, "d2h": 0}}


def test_live_bytes_peak_views_frees_and_pre_existing_storages():
    base = torch.ones(1000, device="meta")
    with LiveBytes() as mem:
        a = base * 2  # 4000 bytes
        view = a.view(10, 100)  # shares a's storage: not counted again
        a.add_(1)  # in place: nothing new
        base.mul_(3)  # a pre-existing storage: never counted
        b = torch.empty(500, dtype=torch.float64, device="meta")  # 4000 bytes: 8000 alive
        del a, b  # the view keeps a's storage alive: 4000
        c = torch.empty(250, device="meta")  # 1000 bytes
        del view
    assert (mem.peak, mem.live, mem.largest) == (8000, 1000, 4000)
    del c
    assert mem.live == 0


def test_live_bytes_on_cpu_temporaries_of_a_chunked_sum():
    t = torch.randn(1 << 16)
    with LiveBytes() as whole:
        t.double().square().sum()  # fp64 copy + its square alive together: 2 * 8 bytes per element
    with LiveBytes() as chunked:
        sum(c.double().square().sum() for c in t.split(1 << 12))
    assert whole.peak >= 2 * 8 * t.numel()
    assert chunked.peak <= 2 * 8 * (1 << 12) + 1024


def test_live_bytes_scope_counts_only_allocations_below_it(tmp_path):
    code = load_module(tmp_path / "alloc_code.py", "import torch\ndef make(n):\n    return torch.empty(n, device='meta')\n")
    with LiveBytes(scope=str(tmp_path)) as mem:
        outside = torch.empty(100, device="meta")
        inside = code.make(10)
    assert mem.peak == 40 and outside.numel() == 100 and inside.numel() == 10


def test_module_examples():
    assert doctest.testmod(instruments).failed == 0
