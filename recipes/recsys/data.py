"""Interaction data: readers, validation, leave-one-out split, seeded negatives, datasets.

Formats
- ``sasrec``: one ``user item`` pair per line (whitespace separated, positive integer ids, each
  user's lines in time order), as shipped with SASRec. Item ids are used as they are (1..max id);
  ``0`` is the padding item.
- ``csv`` / ``parquet``: a table with user, item and timestamp columns (MovieLens style), read with
  ``datasets``. Ids may be anything hashable; items are renumbered ``1..N`` in sorted id order and
  each user's rows are sorted by timestamp (stable, so ties keep file order).

Every error names the file, the line (or row) and what to do; nothing is silently dropped except users
with fewer than ``min_interactions`` interactions, whose count is reported.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from recipes._shared.errors import check_text_file

__all__ = [
    "FORMATS",
    "EvalDataset",
    "Interactions",
    "Split",
    "TrainDataset",
    "collate_eval",
    "filter_short",
    "leave_one_out",
    "load_interactions",
    "read_sasrec",
    "read_table",
    "sample_negatives",
]

FORMATS = ("auto", "sasrec", "csv", "parquet")


@dataclasses.dataclass
class Interactions:
    """Per-user item sequences in time order (item ids ``1..num_items``; 0 is padding).

    ``users[i]`` is the original id of the user of ``sequences[i]``; ``item_labels[j]`` the original id
    of item ``j`` when items were renumbered (csv/parquet), else ``None``.
    """

    sequences: list[np.ndarray]
    users: list
    num_items: int
    item_labels: list | None = None
    dropped_users: int = 0

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def read_sasrec(path: str | Path) -> Interactions:
    """Read a SASRec ``user item`` file.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.txt"); _ = open(p, "w").write("1 3\\n1 2\\n2 1\\n")
    >>> d = read_sasrec(p); (d.num_users, d.num_items, d.sequences[0].tolist())
    (2, 3, [3, 2])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interaction file {str(path)!r} does not exist; pass --data.path=<file>")
    check_text_file(path, "interaction file")
    seqs: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue  # blank lines (e.g. a trailing newline) carry nothing
            if len(fields) != 2:
                raise ValueError(
                    f"{path}:{lineno}: expected 2 fields 'user item' (SASRec format), got {len(fields)}: "
                    f"{line.rstrip()!r}; for a table with a header use --data.format=csv"
                )
            try:
                user, item = int(fields[0]), int(fields[1])
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: user and item ids must be integers in SASRec format, got "
                    f"{line.rstrip()!r}; for other ids use a csv/parquet table (--data.format=csv)"
                ) from None
            if user < 1 or item < 1:
                raise ValueError(
                    f"{path}:{lineno}: ids start at 1 in SASRec format (0 is the padding item), got "
                    f"{line.rstrip()!r}"
                )
            seqs.setdefault(user, []).append(item)
    if not seqs:
        raise ValueError(f"{path}: no interactions found (empty file?)")
    users = sorted(seqs)
    num_items = max(max(s) for s in seqs.values())
    return Interactions([np.asarray(seqs[u], dtype=np.int64) for u in users], users, num_items)


def read_table(
    path: str | Path, user_col: str = "user", item_col: str = "item", time_col: str | None = "timestamp"
) -> Interactions:
    """Read a csv or parquet table of interactions with ``datasets``; items are renumbered ``1..N``.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.csv")
    >>> _ = open(p, "w").write("user,item,timestamp\\na,x,2\\na,y,1\\nb,x,5\\n")
    >>> d = read_table(p); (d.item_labels, d.sequences[0].tolist())
    ([None, 'x', 'y'], [2, 1])
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interaction file {str(path)!r} does not exist; pass --data.path=<file>")
    fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
    if fmt == "csv":
        check_text_file(path, "interaction file")
    ds = datasets.Dataset.from_parquet(str(path)) if fmt == "parquet" else datasets.Dataset.from_csv(str(path))
    wanted = [user_col, item_col] + ([time_col] if time_col else [])
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; the table has {ds.column_names}. Name them with "
            f"--data.user_col / --data.item_col / --data.time_col (time_col=null keeps file order)"
        )
    df = ds.select_columns(wanted).to_pandas()
    for c in wanted:
        bad = df[c].isna().to_numpy().nonzero()[0]
        if len(bad):
            # +2: 1-based, plus the header line of a csv
            raise ValueError(f"{path}: empty value in column {c!r} at data row {int(bad[0]) + 1} "
                             f"(line {int(bad[0]) + 2} of a csv with a header)")
    if time_col:
        df = df.sort_values([user_col, time_col], kind="stable")
    else:
        df = df.sort_values([user_col], kind="stable")
    labels, codes = np.unique(df[item_col].to_numpy(), return_inverse=True)
    df = df.assign(_item=codes.astype(np.int64) + 1)
    users, seqs = [], []
    for user, group in df.groupby(user_col, sort=True):
        users.append(user)
        seqs.append(group["_item"].to_numpy())
    return Interactions(seqs, users, len(labels), item_labels=[None] + labels.tolist())


def load_interactions(
    path: str | Path,
    format: str = "auto",
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
) -> Interactions:
    """Read interactions; ``format="auto"`` picks csv/parquet by suffix and SASRec text otherwise.

    >>> load_interactions("x.txt", format="json")
    Traceback (most recent call last):
    ValueError: format 'json' is not supported; choose one of ('auto', 'sasrec', 'csv', 'parquet')
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not supported; choose one of {FORMATS}")
    suffix = Path(path).suffix.lower()
    if format == "auto":
        format = "csv" if suffix in (".csv", ".tsv") else "parquet" if suffix in (".parquet", ".pq") else "sasrec"
    if format == "sasrec":
        return read_sasrec(path)
    return read_table(path, user_col, item_col, time_col)


def filter_short(data: Interactions, min_interactions: int = 3) -> Interactions:
    """Drop users with fewer than ``min_interactions`` interactions (a warning reports how many).

    Leave-one-out needs at least 3: one to train on, one to validate, one to test.

    >>> d = Interactions([np.array([1, 2, 3]), np.array([1])], ["a", "b"], 3)
    >>> import warnings; warnings.simplefilter("ignore")
    >>> filter_short(d).users, filter_short(d).dropped_users
    (['a'], 1)
    """
    if min_interactions < 3:
        raise ValueError(f"min_interactions must be >= 3 for leave-one-out (train, valid, test), got {min_interactions}")
    keep = [i for i, s in enumerate(data.sequences) if len(s) >= min_interactions]
    dropped = data.num_users - len(keep)
    if not keep:
        raise ValueError(
            f"no user has at least {min_interactions} interactions ({data.num_users} users, "
            f"{data.num_interactions} interactions); leave-one-out needs train, validation and test items"
        )
    if dropped:
        warnings.warn(f"dropped {dropped} of {data.num_users} users with fewer than {min_interactions} interactions",
                      stacklevel=2)
    return dataclasses.replace(
        data,
        sequences=[data.sequences[i] for i in keep],
        users=[data.users[i] for i in keep],
        dropped_users=data.dropped_users + dropped,
    )


@dataclasses.dataclass
class Split:
    """Leave-one-out split: ``train[u]`` all but the last two items, then the validation and test targets."""

    train: list[np.ndarray]
    valid: np.ndarray  # [U] second-to-last item
    test: np.ndarray  # [U] last item


def leave_one_out(sequences: Sequence[np.ndarray]) -> Split:
    """Split each sequence: last item test, second-to-last validation, the rest training.

    >>> s = leave_one_out([np.array([5, 6, 7, 8])]); (s.train[0].tolist(), int(s.valid[0]), int(s.test[0]))
    ([5, 6], 7, 8)
    """
    short = [i for i, s in enumerate(sequences) if len(s) < 3]
    if short:
        raise ValueError(f"leave-one-out needs >= 3 items per user; user index {short[0]} has "
                         f"{len(sequences[short[0]])} (filter with filter_short first)")
    return Split(
        train=[np.asarray(s[:-2]) for s in sequences],
        valid=np.array([s[-2] for s in sequences], dtype=np.int64),
        test=np.array([s[-1] for s in sequences], dtype=np.int64),
    )


def sample_negatives(seen: Sequence[np.ndarray], num_items: int, n: int = 100, seed: int = 0) -> np.ndarray:
    """For each user, ``n`` distinct items in ``1..num_items`` drawn uniformly among those not in ``seen[u]``.

    Reproducible: the result depends only on ``(seen, num_items, n, seed)``. Raises a ``ValueError``
    naming the user when fewer than ``n`` unseen items exist (the 100-negative protocol would be
    meaningless there). The original SASRec code samples with replacement; here the ``n`` are distinct,
    as the protocol ("100 items the user never interacted with") reads.

    >>> sample_negatives([np.array([1, 2])], num_items=5, n=3, seed=0)[0].tolist()  # the only 3 unseen
    [3, 4, 5]
    """
    rng = np.random.default_rng(seed)
    out = np.empty((len(seen), n), dtype=np.int64)
    for u, s in enumerate(seen):
        s_set = np.unique(s)
        unseen = num_items - int(((s_set >= 1) & (s_set <= num_items)).sum())
        if unseen < n:
            raise ValueError(
                f"user index {u} has seen {num_items - unseen} of {num_items} items, leaving {unseen} < {n} "
                f"unseen items to sample negatives from; lower --data.num_eval_negatives or drop such users"
            )
        if unseen < 4 * n:  # dense user: choose directly among the unseen items
            pool = np.setdiff1d(np.arange(1, num_items + 1), s_set, assume_unique=True)
            out[u] = np.sort(rng.choice(pool, n, replace=False))
            continue
        got = np.empty(0, dtype=np.int64)
        while len(got) < n:  # rejection: draw, drop seen and repeats, keep draw order
            cand = rng.integers(1, num_items + 1, size=2 * n)
            cand = cand[~np.isin(cand, s_set)]
            cand = np.concatenate([got, cand])
            _, first = np.unique(cand, return_index=True)
            got = cand[np.sort(first)]
        out[u] = got[:n]
    return out


def _left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.int64)
    seq = seq[-length:]
    if len(seq):
        out[-len(seq):] = seq
    return out


class TrainDataset(Dataset):
    """One row per user with >= 2 training items: the last ``max_len + 1`` items, left-padded with 0.

    Returns ``{"seq": [max_len + 1], "neg": [max_len + 1]}``; ``neg[t]`` is an item the user never
    trained on, a sampled negative for target position ``t`` (as SASRec: fresh every epoch).
    """

    def __init__(self, train: Sequence[np.ndarray], num_items: int, max_len: int, seed: int = 0):
        self.seqs = [s for s in train if len(s) >= 2]
        if not self.seqs:
            raise ValueError("no user has 2 or more training items (needs >= 4 interactions); nothing to train on")
        self.num_items, self.max_len = num_items, max_len
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        seq = _left_pad(self.seqs[i], self.max_len + 1)
        neg = self.rng.integers(1, self.num_items + 1, size=self.max_len + 1)
        for _ in range(100):  # resample the few negatives that hit the user's items
            bad = np.isin(neg, self.seqs[i])
            if not bad.any() or len(np.unique(self.seqs[i])) >= self.num_items:
                break
            neg[bad] = self.rng.integers(1, self.num_items + 1, size=int(bad.sum()))
        neg[seq == 0] = 0
        return {"seq": torch.from_numpy(seq), "neg": torch.from_numpy(neg)}


class EvalDataset(Dataset):
    """Evaluation rows: the history (left-padded to ``max_len``), the target, sampled negatives and the seen items.

    For validation the history is the training part; for test it is training + the validation item.
    """

    def __init__(self, histories: Sequence[np.ndarray], targets: np.ndarray, negatives: np.ndarray, max_len: int,
                 users: np.ndarray | None = None):
        self.hist, self.targets, self.negatives, self.max_len = histories, targets, negatives, max_len
        self.users = np.arange(len(histories)) if users is None else users

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> dict:
        u = int(self.users[i])
        return {
            "seq": torch.from_numpy(_left_pad(self.hist[u], self.max_len)),
            "target": torch.tensor(int(self.targets[u])),
            "negatives": torch.from_numpy(self.negatives[u]),
            "seen": torch.from_numpy(np.unique(self.hist[u])),
        }


def collate_eval(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack fixed-size fields; the ragged seen items become ``seen_rows`` / ``seen_items`` index pairs."""
    out = {k: torch.stack([r[k] for r in rows]) for k in ("seq", "target", "negatives")}
    out["seen_rows"] = torch.cat([torch.full((len(r["seen"]),), i, dtype=torch.long) for i, r in enumerate(rows)])
    out["seen_items"] = torch.cat([r["seen"] for r in rows])
    return out
