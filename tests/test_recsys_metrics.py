"""HR@k / NDCG@k from the target rank: hand-computed cases, an fp64 sort reference, and torchmetrics."""

import math

import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG

from recipes.recsys.metrics import hit_rate, ndcg, rank_metrics, target_rank


def test_hand_computed_ranks_and_metrics():
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.7],  # target col 0: two above -> rank 2
                           [0.8, 0.1, 0.2, 0.3],  # rank 0
                           [0.0, 0.1, 0.2, 0.3]])  # rank 3
    rank = target_rank(scores, 0)
    assert rank.tolist() == [2, 0, 3]
    m = rank_metrics(rank, ks=(1, 3))
    assert m["hr@1"].tolist() == [0.0, 1.0, 0.0]
    assert m["hr@3"].tolist() == [1.0, 1.0, 0.0]
    assert m["ndcg@3"].tolist() == pytest.approx([1 / math.log2(4), 1.0, 0.0])
    assert m["ndcg@1"].tolist() == [0.0, 1.0, 0.0]


def test_target_column_per_row_and_valid_mask():
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.7], [0.5, 0.9, 0.1, 0.7]])
    assert target_rank(scores, torch.tensor([3, 2])).tolist() == [1, 3]
    valid = torch.tensor([[True, False, True, True], [False, False, True, True]])  # masked candidates don't count
    assert target_rank(scores, torch.tensor([3, 2]), valid).tolist() == [0, 1]


def test_ties_are_pessimistic_and_nan_ranks_last():
    # a dead model (constant scores) must not score a perfect HR
    assert target_rank(torch.zeros(2, 101), 0).tolist() == [100, 100]
    assert hit_rate(target_rank(torch.zeros(1, 101), 0), 10).item() == 0.0
    s = torch.tensor([[float("nan"), 0.1, 0.2], [0.3, float("nan"), 0.2]])
    assert target_rank(s, 0).tolist() == [2, 0]


def test_against_fp64_sort_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 30, generator=g, dtype=torch.float64)
    target = torch.randint(0, 30, (64,), generator=g)
    order = scores.argsort(dim=1, descending=True)  # distinct scores: the sort position is the rank
    ref = (order == target[:, None]).nonzero()[:, 1]
    rank = target_rank(scores, target)
    assert torch.equal(rank, ref)
    for k in (1, 5, 10):
        assert torch.allclose(ndcg(rank, k).double(), torch.where(ref < k, 1 / torch.log2(ref + 2.0), 0.0).double(),
                              atol=1e-7)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_against_torchmetrics_retrieval(k):
    g = torch.Generator().manual_seed(k)
    batch, cands = 40, 25
    scores = torch.randn(batch, cands, generator=g)
    target = torch.randint(0, cands, (batch,), generator=g)
    valid = torch.rand(batch, cands, generator=g) > 0.3
    valid[torch.arange(batch), target] = True
    rank = target_rank(scores, target, valid)
    m = rank_metrics(rank, ks=(k,))
    # torchmetrics on the same candidates: flattened rows, indexes = row id, masked candidates left out
    rel = torch.zeros(batch, cands, dtype=torch.bool)
    rel[torch.arange(batch), target] = True
    idx = torch.arange(batch)[:, None].expand(batch, cands)
    hr, nd = RetrievalHitRate(top_k=k), RetrievalNormalizedDCG(top_k=k)
    hr.update(scores[valid], rel[valid], indexes=idx[valid])
    nd.update(scores[valid], rel[valid], indexes=idx[valid])
    assert m[f"hr@{k}"].mean().item() == pytest.approx(hr.compute().item(), abs=1e-6)
    assert m[f"ndcg@{k}"].mean().item() == pytest.approx(nd.compute().item(), abs=1e-6)
    assert 0.0 < m[f"hr@{k}"].mean().item() < 1.0  # the case is not degenerate


def test_bad_shapes_and_k():
    with pytest.raises(ValueError, match="batch, candidates"):
        target_rank(torch.zeros(5), 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        rank_metrics(torch.tensor([0]), ks=(0,))
