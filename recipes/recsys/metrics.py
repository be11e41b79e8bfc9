"""HR@k and NDCG@k from the target's rank, in batched tensor code.

With one relevant item per user (leave-one-out), both metrics depend only on the target's 0-based rank
``r`` among the candidates: HR@k = [r < k], NDCG@k = [r < k] / log2(r + 2) (the ideal DCG is 1).

Ties are broken *pessimistically*: every other candidate scoring the same as the target ranks above it.
A model that outputs constant scores therefore gets HR@k ~ 0, not 1 (an optimistic tie rule would
report a perfect metric for a dead model). NaN scores count as -inf, and a NaN target score ranks last.
"""

from __future__ import annotations

import torch

__all__ = ["hit_rate", "ndcg", "rank_metrics", "target_rank"]


def target_rank(scores: torch.Tensor, target: torch.Tensor | int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of the target among the candidates of each row (pessimistic on ties).

    ``scores`` is ``[B, C]``; ``target`` the column of the target in each row (an int for all rows, or a
    ``[B]`` tensor); ``valid`` an optional ``[B, C]`` bool mask of the candidates that take part (others,
    e.g. items the user has seen, are ignored). Returns a ``[B]`` long tensor.

    >>> target_rank(torch.tensor([[0.9, 0.1, 1.2], [0.3, 0.2, 0.1]]))
    tensor([1, 0])
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, candidates], got shape {tuple(scores.shape)}")
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    if isinstance(target, int):
        target = torch.full((scores.shape[0],), target, dtype=torch.long, device=scores.device)
    target = target.to(scores.device).long()
    t = scores.gather(1, target[:, None])
    above = scores >= t
    above.scatter_(1, target[:, None], False)  # the target does not rank above itself
    if valid is not None:
        above &= valid.to(scores.device)
    return above.sum(1)


def hit_rate(rank: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per-row HR@k from 0-based ranks: ``1.0`` if the target is in the top k.

    >>> hit_rate(torch.tensor([0, 9, 10]), k=10)
    tensor([1., 1., 0.])
    """
    return (rank < k).float()


def ndcg(rank: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per-row NDCG@k from 0-based ranks (one relevant item): ``1 / log2(rank + 2)`` inside the top k.

    >>> ndcg(torch.tensor([0, 1, 10]), k=10)
    tensor([1.0000, 0.6309, 0.0000])
    """
    gain = 1.0 / torch.log2(rank.double() + 2.0)
    return torch.where(rank < k, gain, torch.zeros_like(gain)).float()


def rank_metrics(rank: torch.Tensor, ks: tuple[int, ...] = (10,)) -> dict[str, torch.Tensor]:
    """Per-row ``{"hr@k": ..., "ndcg@k": ...}`` for every k (mean them to get the reported numbers).

    >>> {n: v.mean().item() for n, v in rank_metrics(torch.tensor([0, 3]), ks=(1,)).items()}
    {'hr@1': 0.5, 'ndcg@1': 0.5}
    """
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out[f"hr@{k}"] = hit_rate(rank, k)
        out[f"ndcg@{k}"] = ndcg(rank, k)
    return out
