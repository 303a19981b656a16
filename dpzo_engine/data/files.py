"""The user's own data files (``--train-file``, ``--validation-file``, ``--test-file``), read with ``datasets``.

CSV and TSV files need a header row; JSON Lines (or a JSON array) holds one object per example.
Every problem ends in a ``DataError`` naming the file: not UTF-8 (with the line), empty, a
column that is missing, a label the other splits do not know. When only a training file is
given, dev and test are carved from it per class: test with a fixed seed (the same test set
for every ``--seed``, and for a later ``python -m dpzo_engine.evaluate`` on the same file), dev
with the data seed.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .loaders import (
    Columns,
    DataError,
    Example,
    LabelSpace,
    LocalData,
    Table,
    dataset_tables,
    resolve_columns,
    table_examples,
)

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}
CARVE_FRACTION = 0.1  # of each class, for test and for dev, when only a training file is given


@dataclass(frozen=True)
class SplitFiles:
    """Paths of the user's splits; ``train`` is required, the others are optional."""

    train: str
    dev: str | None = None
    test: str | None = None

    def items(self) -> list[tuple[str, str]]:
        return [(s, p) for s, p in (("train", self.train), ("dev", self.dev), ("test", self.test)) if p is not None]


def read_split_files(
    files: SplitFiles,
    *,
    columns: Columns | None = None,
    label_names: Sequence[str] | None = None,
    drop_labels: Iterable[str] = (),
    seed: int = 0,
    test_seed: int = 0,
) -> LocalData:
    """Labelled train / dev / test examples from the user's files (see the module docstring).

    Every file given must be labelled; the label names come from ``label_names`` or the training
    file. A split without a file is carved from train: test with ``test_seed``, dev with ``seed``."""
    tables = {split: read_file(Path(path).expanduser()) for split, path in files.items()}
    wanted = columns or Columns()
    resolved = {split: resolve_columns(t, wanted) for split, t in tables.items()}
    train_label = resolved["train"].label
    assert train_label is not None
    dropped = list(drop_labels)
    space = (
        LabelSpace(tuple(label_names), frozenset(dropped))
        if label_names is not None
        else LabelSpace.infer([tables["train"]], train_label, dropped)
    )
    splits = {split: table_examples(t, resolved[split], space) for split, t in tables.items()}
    pairs = {split: examples[0].text_pair is not None for split, examples in splits.items()}
    if len(set(pairs.values())) > 1:
        with_pair = [files.items()[i][1] for i, has in enumerate(pairs.values()) if has]
        raise DataError(f"{with_pair[0]} has a second text column and another split has not; name it in every file")
    splits = carve(splits, space.names, seed, test_seed, files.train)
    return LocalData(splits, space.names, dict(files.items()))


def carve(
    splits: dict[str, list[Example]], names: Sequence[str], seed: int, test_seed: int, source: str
) -> dict[str, list[Example]]:
    """Test and dev, where no file gave them, from train: per class ``CARVE_FRACTION`` (at least one)
    each, test with ``test_seed`` (fixed, whatever the data seed), dev with ``seed``."""
    missing = [s for s in ("test", "dev") if s not in splits]
    if not missing:
        return splits
    pools: list[list[Example]] = [[] for _ in names]
    for e in splits["train"]:
        pools[e.label].append(e)
    out = {**splits, "train": [], **{s: [] for s in missing}}
    for c, pool in enumerate(pools):
        if not pool:
            continue  # a label name given by the user that the file never uses
        take = max(1, round(CARVE_FRACTION * len(pool)))
        if len(pool) < take * len(missing) + 1:
            raise DataError(
                f"{source}: class '{names[c]}' has only {len(pool)} example{'s' * (len(pool) > 1)}, too few to "
                f"carve {' and '.join(missing)} from (give --{'test' if 'test' in missing else 'validation'}-file)"
            )
        order = list(range(len(pool)))
        if "test" in missing:
            random.Random(f"{test_seed}:{c}").shuffle(order)
            out["test"] += [pool[i] for i in sorted(order[:take])]
            order = sorted(order[take:])
        random.Random(f"{seed}:{c}").shuffle(order)
        if "dev" in missing:
            out["dev"] += [pool[i] for i in sorted(order[:take])]
            order = order[take:]
        out["train"] += [pool[i] for i in sorted(order)]
    random.Random(seed).shuffle(out["train"])
    return out


# ----------------------------------------------------------------------------- reading one file


def read_file(path: Path) -> Table:
    """One CSV / TSV / JSONL / JSON file as a ``Table``, through ``datasets.load_dataset``."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported file type '{suffix or path.name}' (use .csv, .tsv, .jsonl or .json)")
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'file not found'}")
    check_utf8(path)
    kwargs: dict = {}
    if FORMATS[suffix] == "csv":
        kwargs = _csv_options(path, "\t" if suffix == ".tsv" else ",")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        loaded = datasets.load_dataset(FORMATS[suffix], data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # parser errors arrive wrapped (DatasetGenerationError): report the cause
        cause = exc.__cause__ or exc
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"{path}: cannot read as {FORMATS[suffix].upper()} ({detail[:200]})") from exc
    return dataclasses.replace(dataset_tables(loaded, str(path))["train"], source=str(path))


def _csv_options(path: Path, delimiter: str) -> dict:
    """Every column read as text (pandas would turn "007" into 7 and "NA" into a missing value)."""
    from datasets import Features, Value

    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = (r for r in csv.reader(f, delimiter=delimiter) if any(c.strip() for c in r))
        header, first = next(rows, None), next(rows, None)
    if not header:
        raise DataError(f"{path}: the first line must name the columns (e.g. text,label)")
    if first is None:
        raise DataError(f"{path}: no examples below the header")
    if len(set(header)) != len(header):
        raise DataError(f"{path}: repeated column names in the header: {', '.join(header)}")
    options = {
        "sep": delimiter,
        "features": Features({name: Value("string") for name in header}),
        "keep_default_na": False,
        "encoding": "utf-8-sig",
    }
    if delimiter == "\t":
        options["quoting"] = csv.QUOTE_NONE  # GLUE TSVs hold unbalanced quotes in their text
    return options


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Refuse a file that is empty or not valid UTF-8, naming the line of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, seen_text = 1, False
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:  # exc.object: the bytes held back from the last chunk, then this one
                line += exc.object[: exc.start].count(b"\n")
                raise DataError(
                    f"{path}:{line}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); save the file as UTF-8"
                ) from None
            line += text.count("\n")
            seen_text = seen_text or bool(text.strip().lstrip("\ufeff"))
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}:{line}: not UTF-8 (the file ends inside a character)") from None
    if not seen_text:
        raise DataError(f"{path}: file is empty")
