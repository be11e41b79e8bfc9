"""Readers, validation, leave-one-out split, negative sampling and the datasets of the recommendation recipe."""

import warnings

import numpy as np
import pandas as pd
import pytest

from recipes.recsys.data import (
    EvalDataset,
    Interactions,
    TrainDataset,
    collate_eval,
    filter_short,
    leave_one_out,
    load_interactions,
    read_sasrec,
    read_table,
    sample_negatives,
)
from recipes.recsys.synthetic import synthetic_interactions


def _write(tmp_path, text, name="inter.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_read_sasrec_keeps_order_and_ids(tmp_path):
    p = _write(tmp_path, "2 7\n1 5\n1 3\n\n2 1\n1 9\n")
    d = read_sasrec(p)
    assert d.users == [1, 2]
    assert [s.tolist() for s in d.sequences] == [[5, 3, 9], [7, 1]]
    assert d.num_items == 9 and d.num_interactions == 5


@pytest.mark.parametrize("line, match", [
    ("1 2 3", r"inter\.txt:3: expected 2 fields"),
    ("1 x", r"inter\.txt:3: user and item ids must be integers"),
    ("1 2.5", r"inter\.txt:3: user and item ids must be integers"),
    ("0 4", r"inter\.txt:3: ids start at 1"),
])
def test_read_sasrec_bad_lines_name_the_line(tmp_path, line, match):
    p = _write(tmp_path, f"1 1\n1 2\n{line}\n1 3\n")
    with pytest.raises(ValueError, match=match):
        read_sasrec(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sasrec(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="no interactions"):
        read_sasrec(_write(tmp_path, "\n\n"))
    with pytest.raises(ValueError, match="format 'xml' is not supported"):
        load_interactions(tmp_path / "x", format="xml")


def test_read_table_csv_sorts_by_time_and_renumbers(tmp_path):
    p = _write(tmp_path, "uid,movie,ts\nb,m10,3\na,m2,9\na,m10,1\na,m7,5\nb,m2,1\n", "x.csv")
    d = load_interactions(p, user_col="uid", item_col="movie", time_col="ts")
    assert d.users == ["a", "b"]
    assert d.item_labels == [None, "m10", "m2", "m7"]
    # a: m10 (t1), m7 (t5), m2 (t9) ; b: m2 (t1), m10 (t3)
    assert [s.tolist() for s in d.sequences] == [[1, 3, 2], [2, 1]]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['timestamp'\]"):
        read_table(p, user_col="uid", item_col="movie")


def test_read_table_parquet_matches_csv(tmp_path):
    df = pd.DataFrame({"user": [3, 3, 1, 1, 1], "item": [40, 10, 10, 20, 30], "timestamp": [2, 1, 3, 2, 1]})
    df.to_parquet(tmp_path / "x.parquet")
    df.to_csv(tmp_path / "x.csv", index=False)
    a, b = load_interactions(tmp_path / "x.parquet"), load_interactions(tmp_path / "x.csv")
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences] == [[3, 2, 1], [1, 4]]


def test_filter_short_reports_and_errors():
    d = Interactions([np.array([1, 2, 3]), np.array([1, 2]), np.array([4])], ["a", "b", "c"], 4)
    with pytest.warns(UserWarning, match="dropped 2 of 3 users with fewer than 3"):
        f = filter_short(d)
    assert f.users == ["a"] and f.dropped_users == 2
    with pytest.raises(ValueError, match="no user has at least 4 interactions"):
        filter_short(d, 4)
    with pytest.raises(ValueError, match="must be >= 3"):
        filter_short(d, 2)


def test_leave_one_out():
    s = leave_one_out([np.array([1, 2, 3, 4, 5]), np.array([7, 8, 9])])
    assert [t.tolist() for t in s.train] == [[1, 2, 3], [7]]
    assert s.valid.tolist() == [4, 8] and s.test.tolist() == [5, 9]
    with pytest.raises(ValueError, match="needs >= 3 items"):
        leave_one_out([np.array([1, 2])])


def test_negatives_exclude_seen_distinct_and_reproducible():
    d = synthetic_interactions(num_users=200, num_items=150, seed=3)
    neg = sample_negatives(d.sequences, d.num_items, n=100, seed=7)  # users see <= 20 of 150: dense path too
    assert neg.shape == (200, 100)
    for s, row in zip(d.sequences, neg):
        assert not np.isin(row, s).any()
        assert len(np.unique(row)) == 100
        assert row.min() >= 1 and row.max() <= 150
    assert np.array_equal(neg, sample_negatives(d.sequences, d.num_items, n=100, seed=7))
    assert not np.array_equal(neg, sample_negatives(d.sequences, d.num_items, n=100, seed=8))


def test_negatives_are_uniform_over_unseen_items():
    seen = [np.array([1, 2, 3])] * 4000
    counts = np.bincount(sample_negatives(seen, 1000, n=10, seed=0).ravel(), minlength=1001)
    assert counts[:4].sum() == 0
    # 40,000 draws over 997 items: about 40 each; a biased sampler (e.g. low ids) fails this
    assert 20 < counts[4:].min() and counts[4:].max() < 65
    assert abs(counts[4:504].sum() - counts[504:].sum()) < 1000


def test_negatives_impossible_is_an_error():
    with pytest.raises(ValueError, match=r"user index 1 has seen 8 of 10 items, leaving 2 < 5"):
        sample_negatives([np.array([1]), np.arange(1, 9)], 10, n=5)


def test_train_dataset_left_pads_and_samples_unseen_negatives():
    seqs = [np.array([3, 4, 5]), np.array([1]), np.array([6, 7, 8, 9, 10, 11])]
    ds = TrainDataset(seqs, num_items=12, max_len=4, seed=0)
    assert len(ds) == 2  # the 1-item user has nothing to learn from
    row = ds[0]
    assert row["seq"].tolist() == [0, 0, 3, 4, 5]
    assert row["neg"][:2].tolist() == [0, 0]
    assert ds[1]["seq"].tolist() == [7, 8, 9, 10, 11]  # the most recent max_len + 1 items
    for _ in range(20):
        for i, s in enumerate([seqs[0], seqs[2]]):
            neg = ds[i]["neg"].numpy()
            assert not np.isin(neg[neg > 0], s).any()


def test_eval_dataset_and_collate():
    hist = [np.array([1, 2, 2]), np.array([4, 5, 6, 7, 8])]
    ds = EvalDataset(hist, np.array([3, 9]), np.array([[5, 6], [1, 2]]), max_len=4)
    b = collate_eval([ds[0], ds[1]])
    assert b["seq"].tolist() == [[0, 1, 2, 2], [5, 6, 7, 8]]
    assert b["target"].tolist() == [3, 9]
    assert b["seen_rows"].tolist() == [0, 0, 1, 1, 1, 1, 1]  # seen items are unique per user, all of history
    assert b["seen_items"].tolist() == [1, 2, 4, 5, 6, 7, 8]


def test_synthetic_is_deterministic_and_sequential():
    a, b = synthetic_interactions(num_users=300, seed=1), synthetic_interactions(num_users=300, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    # planted structure: the most frequent successor of an item follows it ~p_follow of the time
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in a.sequences])
    top = pd.DataFrame(pairs, columns=["a", "b"]).groupby("a")["b"].agg(lambda x: x.value_counts().iloc[0] / len(x))
    assert 0.7 < top.mean() < 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filter_short(a)  # every synthetic user is long enough
