"""Bad input: the :class:`RecipeError` every check raises, the checks of input files that would otherwise fail
mid-training (text encoding, unreadable images, ``--config`` YAML), and the one ``error:`` line a recipe exits with.

Example:
    >>> from recipes._shared.errors import RecipeError, main_or_exit
    >>> def cli(args): raise RecipeError("--data.batch_size=0 must be >= 1.")
    >>> main_or_exit(cli, [])  # doctest: +SKIP
    error: --data.batch_size=0 must be >= 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union


class RecipeError(ValueError):
    """Bad recipe input (config, data or checkpoint), raised before training starts."""


def check_text_file(path: Union[str, os.PathLike], what: str = "file") -> None:
    r"""Raise :class:`RecipeError` when a text data file is empty (0 bytes) or not UTF-8 (naming the byte offset).

    Reads the file once, in 1 MiB chunks, with an incremental decoder.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.csv"; _ = p.write_bytes(b"a,b\n\xff\n")
        >>> check_text_file(p)
        Traceback (most recent call last):
        recipes._shared.errors.RecipeError: file ... is not UTF-8: byte 0xff at offset 4 ...
    """
    import codecs

    path = Path(path)
    if path.stat().st_size == 0:
        raise RecipeError(f"{what} {str(path)!r} is empty (0 bytes); pass a file with a header and rows.")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise RecipeError(
                    f"{what} {str(path)!r} is not UTF-8: byte 0x{chunk[err.start]:02x} at offset {offset + err.start} "
                    f"({err.reason}); re-encode it, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed`.") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise RecipeError(f"{what} {str(path)!r} is not UTF-8: it ends inside a multi-byte character "
                              f"({err.reason}); re-encode it as UTF-8.") from None


#: the suffixes the ``imagefolder`` builder of ``datasets`` reads (PIL decodes them)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def check_image_folder(folder: Union[str, os.PathLike], what: str = "image folder", max_names: int = 5) -> None:
    """Decode every image of an ImageFolder and raise :class:`RecipeError` naming the unreadable ones (and a count).

    A corrupt or truncated file otherwise crashes training when its batch comes, without its name. JPEGs are
    decoded at reduced size (``Image.draft``), which still reads all of their data.

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "cat").mkdir(); _ = (d / "cat" / "a.jpg").write_bytes(b"x")
        >>> check_image_folder(d)
        Traceback (most recent call last):
        recipes._shared.errors.RecipeError: image folder ... has 1 unreadable image(s) of 1: ...a.jpg (...); remove or replace them.
    """
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    bad = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.draft("RGB", (32, 32))
                img.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
            bad.append(f"{path} ({type(err).__name__}: {err})")
    if bad:
        more = f" and {len(bad) - max_names} more" if len(bad) > max_names else ""
        raise RecipeError(f"{what} {str(folder)!r} has {len(bad)} unreadable image(s) of {len(files)}: "
                          f"{'; '.join(bad[:max_names])}{more}; remove or replace them.")


def check_config_files(args: Sequence[str]) -> None:
    """Raise :class:`RecipeError` for a ``--config`` file that does not exist or is not valid YAML (naming the file,
    line and column; jsonargparse would name ``<unicode string>``)."""
    import yaml

    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            raise RecipeError(f"--config {path!r} does not exist; pass a YAML file (see `tick-lightning ls`).")
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except UnicodeDecodeError as err:
            raise RecipeError(f"--config {path!r} is not UTF-8 ({err.reason}); save it as UTF-8.") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise RecipeError(f"--config {path!r} is not valid YAML{where}: {problem}; fix the file.") from None


def main_or_exit(cli: Any, args: Optional[list[str]] = None) -> None:
    """Run ``cli(args)``; bad input (a :class:`RecipeError`) is printed as one ``error:`` line and exits with 2."""
    from tick_lightning.store import TickWriteError

    try:
        cli(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TickWriteError as err:  # a full disk during the fit: the directory and what to do, on one line
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


#: Label cells pandas (and so ``datasets``' csv reader) reads as missing
_MISSING = {"nan", "na", "n/a", "null", "none", "<na>", "-nan", "#n/a"}


def check_table_rows(path: Union[str, os.PathLike], delimiter: str, label_column: Optional[str] = None,
                     what: str = "data file") -> None:
    r"""Raise :class:`RecipeError` naming the row (1 = the header) of a delimited file whose field count differs from
    the header's, or whose ``label_column`` cell is empty or a missing-value marker (``nan``, ``NA``, ...), which
    the csv reader would turn into a float NaN that no label maps to.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.tsv"
        >>> _ = p.write_text("label\ttext\n1\tok\n\tbad\n")
        >>> check_table_rows(p, "\t", "label")
        Traceback (most recent call last):
        recipes._shared.errors.RecipeError: data file ... has an empty label in row 3 ...
    """
    import csv

    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if not header:
            return
        column = header.index(label_column) if label_column in header else None
        for row, fields in enumerate(reader, start=2):
            if not fields:
                continue  # a blank line: the reader skips it too
            if len(fields) != len(header):
                raise RecipeError(f"{what} {str(path)!r} row {row} has {len(fields)} fields, the header has "
                                  f"{len(header)} ({delimiter!r}-separated); fix that row (a stray separator in the "
                                  "text?).")
            if column is not None:
                value = fields[column].strip()
                if not value:
                    raise RecipeError(f"{what} {str(path)!r} has an empty label in row {row} (column "
                                      f"{label_column!r}); give every row a label or drop it.")
                if value.lower() in _MISSING:
                    raise RecipeError(f"{what} {str(path)!r} has the label {value!r} in row {row} (column "
                                      f"{label_column!r}), which reads as a missing value; give every row a label or "
                                      "drop it.")

