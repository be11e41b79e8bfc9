"""A deterministic interaction generator with planted sequential structure (the offline default data).

Items lie on one hidden cycle (a seeded permutation). Each user starts at a random item; each next item
is the cycle successor of the current one with probability ``p_follow`` and a uniformly random item
otherwise. A sequential model can therefore predict the next item about ``p_follow`` of the time, while
popularity or chance gives about ``k / num_items`` (full ranking) or ``k / 101`` (100 negatives).
"""

from __future__ import annotations

import numpy as np

from recipes.recsys.data import Interactions

__all__ = ["synthetic_interactions"]


def synthetic_interactions(
    num_users: int = 1000,
    num_items: int = 200,
    min_len: int = 5,
    max_len: int = 20,
    p_follow: float = 0.8,
    seed: int = 0,
) -> Interactions:
    """Generate ``num_users`` sequences of ``min_len..max_len`` items over ``num_items`` items.

    >>> d = synthetic_interactions(num_users=3, num_items=10, seed=1)
    >>> d.num_users, d.num_items, all(5 <= len(s) <= 20 for s in d.sequences)
    (3, 10, True)
    """
    if not 0.0 <= p_follow <= 1.0:
        raise ValueError(f"p_follow must be in [0, 1], got {p_follow}")
    if not 3 <= min_len <= max_len:
        raise ValueError(f"need 3 <= min_len <= max_len (leave-one-out needs 3 items), got {min_len}, {max_len}")
    if num_items < 2 or num_users < 1:
        raise ValueError(f"need num_items >= 2 and num_users >= 1, got {num_items}, {num_users}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_items) + 1
    succ = np.zeros(num_items + 1, dtype=np.int64)
    succ[order] = np.roll(order, -1)  # succ[order[i]] = order[i + 1]: one cycle through all items
    seqs = []
    for _ in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        follow = rng.random(n) < p_follow
        jump = rng.integers(1, num_items + 1, size=n)
        s = np.empty(n, dtype=np.int64)
        s[0] = jump[0]
        for t in range(1, n):
            s[t] = succ[s[t - 1]] if follow[t] else jump[t]
        seqs.append(s)
    return Interactions(seqs, list(range(1, num_users + 1)), num_items)
