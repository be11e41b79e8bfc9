"""benchmarks/sasrec_games.py's SASRecPytorchProtocol: the reference codebase's evaluation, checked per user."""

import math
from types import SimpleNamespace

import numpy as np
import torch
from tiny import load_benchmark

from recipes.sequential_recommendation import SequentialRecommendationData


def _bench():
    return load_benchmark("sasrec_games")


def _data(tmp_path, num_items=120):
    rng = np.random.default_rng(0)
    lines = []
    for user in range(1, 41):  # users 1-8 have 3 interactions (no SASRec.pytorch evaluation), the rest 6
        items = rng.choice(np.arange(1, num_items + 1), 3 if user <= 8 else 6, replace=False)
        lines += [f"{user} {item}" for item in items]
    path = tmp_path / "games.txt"
    path.write_text("\n".join(lines) + "\n")
    dm = SequentialRecommendationData(path=str(path), format="sasrec", max_len=8)
    dm.setup()
    return dm


class _ByItemId:
    """A stand-in model: every history scores item ``i`` as ``i`` (the target's rank is known by hand)."""

    device = torch.device("cpu")

    def __init__(self, num_items):
        self.model = SimpleNamespace(scores=lambda seq: torch.arange(num_items + 1.0).expand(len(seq), -1))


def test_negatives_avoid_the_history_and_may_repeat(tmp_path):
    dm = _data(tmp_path)
    protocol = _bench().SASRecPytorchProtocol(dm, seed=1)
    history = np.arange(1, 116)  # 5 items left to draw from: 100 draws must repeat
    neg = protocol._draw(history)
    assert neg.shape == (100,) and set(neg.tolist()) <= {116, 117, 118, 119, 120}
    assert len(set(neg.tolist())) == 5  # all five come up in 100 draws


def test_users_targets_and_metrics_match_a_per_user_reference(tmp_path, monkeypatch):
    dm = _data(tmp_path)
    bench = _bench()
    protocol = bench.SASRecPytorchProtocol(dm, k=10, seed=3, sample=25)
    # deterministic negatives: the 100 lowest-id items outside the history, cycled
    items = np.arange(1, dm.num_items + 1)
    monkeypatch.setattr(protocol, "_draw", lambda h: np.resize(np.setdiff1d(items, h), 100))
    got = protocol.evaluate(_ByItemId(dm.num_items))

    ids = [int(u) for u in dm.interactions.users]
    test_users = np.random.default_rng(3).choice(len(ids), 25, replace=False)  # the protocol's first draw
    split = dm.split

    def reference(users, test):
        hr = ndcg = 0.0
        n = 0
        for u in users:
            if len(dm.interactions.sequences[u]) < 4:
                continue  # SASRec.pytorch's data_partition gives these users no validation or test item
            hist = list(split.train[u]) + ([int(split.valid[u])] if test else [])
            target = int(split.test[u] if test else split.valid[u])
            negatives = np.resize(np.setdiff1d(items, hist), 100)
            rank = int((negatives > target).sum())  # scores are item ids
            n += 1
            if rank < 10:
                hr += 1
                ndcg += 1 / math.log2(rank + 2)
        return hr / n, ndcg / n, n

    val_users = [u for u, i in enumerate(ids) if i < 25]  # SASRec.pytorch: user ids 1 .. 9,999 (here 1 .. 24)
    for prefix, users, test in (("ref_val", val_users, False), ("ref_test", test_users, True)):
        hr, ndcg, n = reference(users, test)
        assert got[f"{prefix}/users"] == n and 0 < n < len(users)  # the short users are left out
        assert got[f"{prefix}/hr@10"] == hr and abs(got[f"{prefix}/ndcg@10"] - ndcg) < 1e-7
    assert 0 < got["ref_test/hr@10"] < 1  # neither trivial case: the check can fail either way
