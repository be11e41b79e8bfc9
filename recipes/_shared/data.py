"""Data loading of the recipes: one split from a hub dataset, local files or a recipe's demo data (``datasets``),
column renames and checks (:func:`prepare_split`), its loader (:func:`make_loader`), and
:class:`SplitsDataModule`, the train/validation/test skeleton the text and image recipes share (the causal LM
recipe calls the functions itself).

Example:
    >>> from recipes._shared.data import infer_format
    >>> infer_format("data/train.tsv")
    ('csv', {'delimiter': '\\t'})
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import lightning as L

from recipes._shared.errors import RecipeError, check_image_folder, check_table_rows, check_text_file
from recipes._shared.hub import hub_offline

_FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
            ".jsonl": ("json", {}), ".parquet": ("parquet", {}), ".txt": ("text", {}), ".text": ("text", {})}


def infer_format(path: str) -> tuple[str, dict]:
    """The ``datasets`` builder and its options for a local file or folder (a folder is an ImageFolder).

    Example:
        >>> infer_format("x.parquet")
        ('parquet', {})
    """
    if os.path.isdir(path):
        return "imagefolder", {}
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise RecipeError(f"cannot tell the format of {path!r} from its suffix {suffix!r}; known suffixes: "
                          f"{sorted(_FORMATS)} (or a folder for an ImageFolder); or set --data.format.")
    return _FORMATS[suffix]


def load_split(split: str, *, dataset: Optional[str] = None, data_files: Optional[dict] = None,
               format: Optional[str] = None, dataset_config: Optional[str] = None, flag: str = "--data.dataset",
               label_column: Optional[str] = None):
    """Load one split with ``datasets.load_dataset``: from local ``data_files[split]`` or a hub ``dataset``.

    Local splits are loaded one at a time, so splits whose columns differ (the SST-2 TSVs) load fine;
    ``format`` is ``csv``/``tsv``/``json``/``parquet``/``text``/``imagefolder`` or inferred from the suffix. A local
    csv / tsv is read once first: a ragged row or an empty or missing ``label_column`` cell is named by its row.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train.tsv"; _ = p.write_text("label\\tsentence\\n1\\tgood\\n")
        >>> list(load_split("train", data_files={"train": str(p)})["sentence"])  # doctest: +SKIP
        ['good']
    """
    import datasets

    if data_files:
        if split not in data_files:
            raise RecipeError(f"no file for split {split!r} in --data.data_files; given splits: {sorted(data_files)}.")
        path = data_files[split]
        paths = [path] if isinstance(path, str) else list(path)
        for p in paths:
            if not os.path.exists(p):
                raise RecipeError(f"data file for split {split!r} does not exist: {p!r}.")
        if format in (None, ""):
            builder, opts = infer_format(paths[0])
        elif format == "tsv":
            builder, opts = "csv", {"delimiter": "\t"}
        else:
            builder, opts = format, {}
        for p in paths:
            if builder in ("csv", "json", "text"):
                check_text_file(p, f"data file of split {split!r}")
            if builder == "csv":
                check_table_rows(p, opts.get("delimiter", ","), label_column, f"data file of split {split!r}")
            elif builder == "imagefolder":
                check_image_folder(p, f"image folder of split {split!r}")
        try:
            if builder == "imagefolder":
                return datasets.load_dataset("imagefolder", data_dir=paths[0], split="train")
            return datasets.load_dataset(builder, data_files={split: paths}, split=split, **opts)
        except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as err:
            if "no data" in str(err) or "empty" in str(err).lower() or "No (supported) data" in str(err):
                raise RecipeError(f"split {split!r} is empty: no rows/images in {paths}; check its data file.") from err
            raise RecipeError(f"cannot load split {split!r} from {paths} as {builder!r}: {err}") from err
    if not dataset:
        raise RecipeError("no data: pass --data.dataset=<hub name> or --data.data_files={train: ..., validation: ...}.")
    try:
        return datasets.load_dataset(dataset, dataset_config, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
        if isinstance(err, ValueError) and "Unknown split" in str(err):
            raise RecipeError(f"dataset {dataset!r} has no split {split!r}: {err}") from err
        if hub_offline() or "connect" in str(err).lower() or "offline" in str(err).lower():
            raise RecipeError(
                f"cannot load dataset {dataset!r}: the hub is not reachable (HF_HUB_OFFLINE=1 or no network); pass "
                "local files: --data.data_files={train: /path/train.tsv, validation: /path/dev.tsv}"
            ) from err
        raise RecipeError(f"cannot load dataset {dataset!r} split {split!r}: {err}") from err


def rename_columns(ds, split: str, column_map: Optional[dict]):
    """Rename columns by ``column_map``: either ``{old: new}`` for every split or ``{split: {old: new}}``.

    Example:
        >>> import datasets
        >>> d = datasets.Dataset.from_dict({"content": ["x"], "label": [0]})
        >>> rename_columns(d, "validation", {"validation": {"content": "sentence"}}).column_names
        ['sentence', 'label']
    """
    if not column_map:
        return ds
    if all(isinstance(v, dict) for v in column_map.values()):
        mapping = column_map.get(split, {})
    else:
        mapping = column_map
    mapping = {old: new for old, new in mapping.items() if old in ds.column_names and old != new}
    return ds.rename_columns(mapping) if mapping else ds


def require_columns(ds, split: str, columns: Iterable[str], flag_hint: str = "") -> None:
    """Raise a :class:`RecipeError` listing the available columns when a needed one is missing."""
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise RecipeError(
            f"split {split!r} has no column(s) {missing}; available columns: {ds.column_names}. "
            f"Set the column names{flag_hint} or map them with --data.column_map="
            "{" + split + ": {available_name: expected_name}}."
        )
    if len(ds) == 0:
        raise RecipeError(f"split {split!r} is empty (0 rows); check its data file or dataset name.")


def prepare_split(split: str, *, demo: Callable[[], Any], dataset: Optional[str], dataset_config: Optional[str],
                  data_files: Optional[dict], format: Optional[str], column_map: Optional[dict],
                  columns: Iterable[Optional[str]], columns_hint: str = "", limit: Optional[int] = None,
                  shuffle_before_limit: bool = False, label_column: Optional[str] = None):
    """One split as a ``datasets.Dataset``: :func:`load_split` (or ``demo()`` when there is neither a ``dataset``
    nor ``data_files``), renamed by ``column_map``, cut to ``limit`` rows (a seeded shuffle first with
    ``shuffle_before_limit``) and checked for ``columns`` (:func:`require_columns`).

    Example:
        >>> import datasets
        >>> ds = prepare_split("train", demo=lambda: datasets.Dataset.from_dict({"text": ["a", "b", "c"]}),
        ...                    dataset=None, dataset_config=None, data_files=None, format=None, column_map=None,
        ...                    columns=["text"], limit=2)
        >>> list(ds["text"])
        ['a', 'b']
    """
    if dataset is None and not data_files:
        ds = demo()
    else:
        ds = load_split(split, dataset=dataset, data_files=data_files, format=format, dataset_config=dataset_config,
                        label_column=label_column)
    ds = rename_columns(ds, split, column_map)
    if limit is not None:
        ds = (ds.shuffle(seed=0) if shuffle_before_limit else ds).select(range(min(limit, len(ds))))
    require_columns(ds, split, columns, columns_hint)
    return ds


def make_loader(ds, batch_size: int, *, shuffle: bool, num_workers: int, collate_fn: Optional[Callable] = None):
    """The ``DataLoader`` of one split (worker processes kept between epochs when there are any)."""
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, collate_fn=collate_fn)


class SplitsDataModule(L.LightningDataModule):
    """The skeleton the text and image DataModules share: train/validation/test splits from a hub dataset,
    local files or the recipe's built-in demo data, column renames, row limits, the column check, loaders.

    A subclass states its own ``__init__`` arguments (they are its config) and passes the shared ones on;
    it implements ``_demo(n, seed)`` (the demo rows of one split), ``_columns()`` (what every split needs)
    and ``_collate_fn(train)`` (the loaders' collate function), and may override ``file_format`` and set
    ``columns_hint`` / ``shuffle_before_limit``.
    """

    ROLES = ("train", "validation", "test")
    #: columns hint of the missing-column error, e.g. ``" (--data.text_column, --data.label_column)"``
    columns_hint = ""
    #: ``max_*_samples`` takes a seeded shuffle of the rows first (ImageFolders are sorted by class)
    shuffle_before_limit = False

    def __init__(self, *, dataset: Optional[str], dataset_config: Optional[str], data_files: Optional[dict],
                 label_column: str, column_map: Optional[dict], train_split: str, val_split: Optional[str],
                 test_split: Optional[str], batch_size: int, eval_batch_size: Optional[int], num_workers: int,
                 max_train_samples: Optional[int], max_eval_samples: Optional[int], demo_train_size: int,
                 demo_val_size: int) -> None:
        super().__init__()
        self.dataset, self.dataset_config, self.data_files = dataset, dataset_config, data_files
        self.label_column, self.column_map = label_column, column_map
        self.splits_names = {"train": train_split, "validation": val_split, "test": test_split}
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size or batch_size, num_workers
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.demo_train_size, self.demo_val_size = demo_train_size, demo_val_size
        self.splits: dict[str, Any] = {}
        self.label_names: Optional[list[str]] = None
        self.num_labels: Optional[int] = None

    @property
    def is_demo(self) -> bool:
        return self.dataset is None and not self.data_files

    def roles(self) -> list[str]:
        """The split roles this run has (``test`` only with ``test_split``)."""
        return [r for r in self.ROLES if self.splits_names[r]]

    def file_format(self) -> Optional[str]:
        """The ``load_split`` format of ``data_files`` (None: from the file suffix)."""
        return None

    def _demo(self, n: int, seed: int):
        raise NotImplementedError

    def _columns(self) -> list[Optional[str]]:
        raise NotImplementedError

    def _collate_fn(self, train: bool):
        raise NotImplementedError

    def _raw(self, role: str):
        """One split as a ``datasets.Dataset``: loaded (or demo), renamed, limited and checked for its columns."""
        n = self.demo_train_size if role == "train" else self.demo_val_size
        # demo seeds 0 / 1 / 2: distinct, reproducible splits
        return prepare_split(self.splits_names[role], demo=lambda: self._demo(n, self.ROLES.index(role)),
                             dataset=self.dataset, dataset_config=self.dataset_config, data_files=self.data_files,
                             format=self.file_format(), column_map=self.column_map, columns=self._columns(),
                             columns_hint=self.columns_hint,
                             limit=self.max_train_samples if role == "train" else self.max_eval_samples,
                             shuffle_before_limit=self.shuffle_before_limit,
                             label_column=getattr(self, "label_column", None))

    def _loader(self, role: str, train: bool):
        if role not in self.splits:
            return None
        return make_loader(self.splits[role], self.batch_size if train else self.eval_batch_size, shuffle=train,
                           num_workers=self.num_workers, collate_fn=self._collate_fn(train))

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("validation", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def has_test(self) -> bool:
        return "test" in self.splits
