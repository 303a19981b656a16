"""Reading labelled text examples from local files: CSV, TSV, JSONL/JSON and ``save_to_disk`` dirs.

These files come from users (GLUE, LM-BFF, exports of their own data), so every problem ends
in a ``DataError`` that names the file and what is wrong: the trainer reports it as one line.
Splitting and sampling live in ``tasks``; this module only turns files into ``Example`` lists.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError

SPLIT_FILE_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("dev", "validation", "valid", "val", "dev_matched", "validation_matched"),
    "test": ("test", "test_matched"),
}
FILE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")
TEXT_COLUMNS = ("text", "sentence", "sentence1", "premise", "question1", "content", "review")
PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "text": "text_pair", "question1": "question2"}
LABEL_COLUMNS = ("label", "gold_label", "labels", "sentiment", "category", "class", "answer")
LAYOUT_HINT = (
    "train.{tsv,csv,jsonl} plus test.* (dev.* optional; LM-BFF / GLUE layouts) "
    "or a datasets.save_to_disk directory with train and test splits"
)


class DataError(UserError):
    """A missing or malformed data source; the message names the file and the problem."""


@dataclass(frozen=True)
class Example:
    """One example: ``text_pair`` is the second segment of pair tasks (NLI, QA questions).

    Generation tasks (SQuAD) have ``label == -1`` and their gold ``answers`` (the first one is
    the training target); ``title`` is the article title their template shows.
    """

    text: str
    label: int
    text_pair: str | None = None
    answers: tuple[str, ...] = ()
    title: str | None = None


@dataclass
class Table:
    """A split as read from disk: named columns of raw values, before label mapping."""

    source: str
    columns: dict[str, list[Any]]
    class_names: list[str] | None = None  # from a datasets ClassLabel feature
    header: bool = True

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


# ----------------------------------------------------------------------------- reading files


def read_table(path: Path, *, expected_columns: Iterable[str] = (), encoding: str | None = None) -> Table:
    """Read a CSV / TSV / JSONL / JSON file into a ``Table``.

    Delimited files have a header when their first row names a known (or expected) column;
    otherwise columns are called "0", "1", ... (LM-BFF's headerless ``label,sentence`` CSVs).
    ``encoding=None`` tries UTF-8 and falls back to latin-1, which never fails to decode.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    text = _read_text(path, encoding)
    if suffix in (".tsv", ".csv"):
        return _read_delimited(path, text, "\t" if suffix == ".tsv" else ",", set(expected_columns))
    if suffix in (".jsonl", ".json"):
        return _read_json(path, text)
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .tsv, .csv, .jsonl or .json)")


def _read_text(path: Path, encoding: str | None) -> str:
    if encoding is not None:
        try:
            return path.read_text(encoding=encoding)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: cannot decode as {encoding}: {exc.reason}") from exc
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")


def _read_delimited(path: Path, text: str, delimiter: str, expected: set[str]) -> Table:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # GLUE TSVs contain unbalanced quotes in the text: read them literally.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # StringIO, not splitlines(): quoted fields may hold newlines, and splitlines() also breaks on
    # \x1c, \x85, \u2028 ... which tweets contain.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows = [(reader.line_num, r) for r in reader if r]
    if not rows:
        raise DataError(f"{path}: file is empty")
    known = {c.lower() for c in (*TEXT_COLUMNS, *PAIR_COLUMNS.values(), *LABEL_COLUMNS)} | {c.lower() for c in expected}
    first = rows[0][1]
    header = any(cell.strip().lower() in known for cell in first)
    names = [c.strip() for c in first] if header else [str(i) for i in range(len(first))]
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for lineno, row in rows[1:] if header else rows:
        if len(row) != len(names):
            raise DataError(f"{path}:{lineno}: expected {len(names)} fields, found {len(row)}")
        for name, cell in zip(names, row):
            columns[name].append(cell)
    return Table(str(path), columns, header=header)


def _read_json(path: Path, text: str) -> Table:
    stripped = text.lstrip()
    records: list[Any]
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    else:
        records = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from exc
    if not records:
        raise DataError(f"{path}: file is empty")
    columns: dict[str, list[Any]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i + 1} is not a JSON object")
        for key in rec:
            columns.setdefault(key, [None] * i)
        for key, values in columns.items():
            values.append(rec.get(key))
    return Table(str(path), columns)


def read_dataset_dir(path: Path) -> dict[str, Table]:
    """Splits of a ``datasets.save_to_disk`` directory, keyed by their names there."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard requirement
        raise DataError("reading a save_to_disk directory needs `pip install datasets`") from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a readable datasets.save_to_disk directory ({exc})") from exc
    return dataset_tables(loaded, str(path))


def dataset_tables(loaded: Any, source: str, class_aliases: dict[str, str] | None = None) -> dict[str, Table]:
    """A ``datasets`` Dataset / DatasetDict (from disk or the hub) as tables keyed by split name.

    ``class_aliases`` renames ClassLabel names (the hub's TREC says ``DESC`` where LM-BFF says
    ``description``)."""
    import datasets

    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("train", loaded)]
    tables = {}
    for name, ds in parts:
        class_names = None
        for feature in ds.features.values():
            if isinstance(feature, datasets.ClassLabel):
                class_names = [(class_aliases or {}).get(n, n) for n in feature.names]
        tables[name] = Table(f"{source} [{name}]", ds.to_dict(), class_names=class_names)
    return tables


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json"))


def find_split_file(data_dir: Path, split: str) -> Path | None:
    for stem in SPLIT_FILE_NAMES[split]:
        for suffix in FILE_SUFFIXES:
            candidate = data_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


# ----------------------------------------------------------------------------- labels


@dataclass
class LabelSpace:
    """Maps raw label values (names, or indices as int or str) to class indices.

    Labels listed in ``drop`` are skipped (SNLI's "-" marks pairs without a gold label).
    """

    names: tuple[str, ...]
    drop: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self._index = {str(i): i for i in range(len(self.names))}
        self._index.update({n.strip().lower(): i for i, n in enumerate(self.names)})

    def lookup(self, raw: Any, class_names: Sequence[str] | None = None) -> int | None:
        """Index of ``raw``; None if it is a dropped label; KeyError if unknown."""
        if raw is None:
            raise KeyError(raw)
        if isinstance(raw, bool):  # SuperGLUE BoolQ: JSON true / false
            raw = "true" if raw else "false"
        if class_names is not None and isinstance(raw, int) and 0 <= raw < len(class_names):
            raw = class_names[raw]  # ClassLabel index → its name → our index
        key = _label_key(raw)
        if key in self.drop:
            return None
        return self._index[key]

    @classmethod
    def infer(cls, tables: Sequence[Table], label_column: str, drop: Iterable[str] = ()) -> LabelSpace:
        """Label names from the data: ClassLabel names, else 0..max for integer labels, else sorted names."""
        dropped = frozenset(_label_key(d) for d in drop)
        for t in tables:
            if t.class_names is not None:
                return cls(tuple(t.class_names), dropped)
        keys = {_label_key(v) for t in tables for v in t.columns[label_column] if v is not None} - dropped
        if not keys:
            return cls((), dropped)
        if all(_is_int(k) for k in keys):
            top = max(int(k) for k in keys)
            if min(int(k) for k in keys) < 0:
                bad = min(int(k) for k in keys)
                raise DataError(f"{tables[0].source}: negative label {bad} (unlabelled split?)")
            return cls(tuple(str(i) for i in range(top + 1)), dropped)
        return cls(tuple(sorted(keys)), dropped)


def _label_key(raw: Any) -> str:
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    key = str(raw).strip().lower()
    if key.endswith(".0") and _is_int(key[:-2]):  # "1.0" from spreadsheet / pandas exports
        key = key[:-2]
    return key


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the optional second segment and the label (None: detect)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None


def resolve_columns(table: Table, wanted: Columns) -> Columns:
    """Named columns must exist; unnamed ones are detected from the usual names (see module constants)."""
    present = list(table.columns)
    lower = {c.lower(): c for c in present}

    def need(name: str, role: str) -> str:
        if name in table.columns:
            return name
        if name.lower() in lower:
            return lower[name.lower()]
        raise DataError(f"{table.source}: missing {role} column '{name}' (columns: {', '.join(present)})")

    if not table.header and len(present) == 2 and wanted.text is None and wanted.label is None:
        # headerless two-column file (LM-BFF SST-5/TREC/MR/CR CSVs): the all-integer column is the label
        ints = [all(_is_int(_label_key(v)) for v in table.columns[c]) for c in present]
        if ints[0] != ints[1]:
            label = present[0] if ints[0] else present[1]
            text = present[1] if ints[0] else present[0]
            return Columns(text, None, label)

    def detect(candidates: Iterable[str], role: str, flag: str) -> str:
        for c in candidates:
            if c in lower:
                return lower[c]
        raise DataError(
            f"{table.source}: missing {role} column (looked for {', '.join(candidates)}; "
            f"columns: {', '.join(present)}); name it with {flag}"
        )

    text = need(wanted.text, "text") if wanted.text else detect(TEXT_COLUMNS, "text", "--text-column")
    label = need(wanted.label, "label") if wanted.label else detect(LABEL_COLUMNS, "label", "--label-column")
    if wanted.text_pair:
        pair: str | None = need(wanted.text_pair, "text-pair")
    else:
        partner = PAIR_COLUMNS.get(text.lower())
        pair = lower.get(partner) if partner else None
    return Columns(text, pair, label)


def table_examples(table: Table, columns: Columns, labels: LabelSpace) -> list[Example]:
    """Rows → examples; unknown labels and empty results raise DataError naming the file."""
    assert columns.text is not None and columns.label is not None
    texts, raw_labels = table.columns[columns.text], table.columns[columns.label]
    pairs = table.columns[columns.text_pair] if columns.text_pair else None
    out: list[Example] = []
    for i, raw in enumerate(raw_labels):
        try:
            label = labels.lookup(raw, table.class_names)
        except KeyError:
            expected = ", ".join(labels.names) if labels.names else "none"
            hint = " (unlabelled split?)" if _label_key(raw) in ("-1", "none") else ""
            raise DataError(
                f"{table.source}: unknown label {raw!r} in row {i + 1}{hint}; expected one of: {expected}"
            ) from None
        if label is None:
            continue
        text = texts[i]
        if text is None:
            raise DataError(f"{table.source}: row {i + 1} has no text in column '{columns.text}'")
        pair = None
        if pairs is not None:
            if pairs[i] is None:
                raise DataError(f"{table.source}: row {i + 1} has no text in column '{columns.text_pair}'")
            pair = str(pairs[i])
        out.append(Example(str(text), label, pair))
    if not out:
        raise DataError(f"{table.source}: no labelled examples (empty split)")
    return out


# ----------------------------------------------------------------------------- a local directory


@dataclass
class LocalData:
    """The labelled splits found in a directory ("dev" may be missing) and their label names."""

    splits: dict[str, list[Example]]
    label_names: tuple[str, ...]
    sources: dict[str, str]
    test_from_dev: bool = False  # GLUE / SuperGLUE: the test file is unlabelled, the dev file serves as test


def read_local_dir(
    data_dir: str | Path,
    *,
    columns: Columns = Columns(),
    label_names: Sequence[str] | None = None,
    drop_labels: Iterable[str] = (),
    encoding: str | None = None,
) -> LocalData:
    """Read train / dev / test from ``data_dir`` (see ``LAYOUT_HINT``); train and test are required."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data directory {root} does not exist; expected {LAYOUT_HINT}")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; expected a directory with {LAYOUT_HINT}")
    tables = _dataset_splits(root) if is_dataset_dir(root) else _file_splits(root, columns, encoding)
    return tables_to_data(tables, columns, label_names, drop_labels, str(root))


def tables_to_data(
    tables: dict[str, Table],
    columns: Columns,
    label_names: Sequence[str] | None,
    drop_labels: Iterable[str],
    root: str,
) -> LocalData:
    """Label mapping and checks shared by local directories and hub datasets."""
    resolve_columns(tables["train"], columns)  # problems with train are reported first
    test_from_dev = "test" not in tables or unlabelled(tables["test"], columns)
    if test_from_dev:
        if "dev" not in tables:
            raise DataError(
                f"{tables['test'].source}: the test split is unlabelled (no label column, or -1 everywhere, as in "
                "GLUE / SuperGLUE test files) and there is no labelled dev split to evaluate on instead"
            )
        tables["test"] = tables.pop("dev")  # LM-BFF / MeZO: the original dev set is the test set
    resolved = {split: resolve_columns(t, columns) for split, t in tables.items()}
    if label_names is not None:
        space = LabelSpace(tuple(label_names), frozenset(_label_key(d) for d in drop_labels))
    else:
        train_label = resolved["train"].label
        assert train_label is not None
        space = LabelSpace.infer([tables["train"]], train_label, drop_labels)
    splits = {split: table_examples(t, resolved[split], space) for split, t in tables.items()}
    pair_use = {split: ex[0].text_pair is not None for split, ex in splits.items()}
    if len(set(pair_use.values())) > 1:
        raise DataError(f"{root}: some splits have a second text column and some do not ({pair_use})")
    return LocalData(splits, space.names, {s: t.source for s, t in tables.items()}, test_from_dev)


def unlabelled(table: Table, columns: Columns) -> bool:
    """True for a split without labels: no label column at all, or only -1 / empty labels.

    Headerless two-column files (LM-BFF CSVs) are labelled by position and never count."""
    if not table.header or not table.num_rows:
        return False
    lower = {c.lower(): c for c in table.columns}
    wanted = (columns.label,) if columns.label is not None else LABEL_COLUMNS
    name = next((lower[c.lower()] for c in wanted if c.lower() in lower), None)
    if name is None:
        return True
    return all(v is None or _label_key(v) in ("-1", "") for v in table.columns[name])


def _file_splits(root: Path, columns: Columns, encoding: str | None) -> dict[str, Table]:
    expected = [c for c in (columns.text, columns.text_pair, columns.label) if c]
    tables = {}
    for split in ("train", "dev", "test"):
        path = find_split_file(root, split)
        if path is None:
            if split == "dev" or (split == "test" and "dev" in tables):
                continue  # train + dev only (SuperGLUE without its unlabelled test file): dev is the test set
            names = "/".join(SPLIT_FILE_NAMES[split])
            raise DataError(f"{root}: no {names}.{{tsv,csv,jsonl,json}} file; expected {LAYOUT_HINT}")
        tables[split] = read_table(path, expected_columns=expected, encoding=encoding)
    return tables


def _dataset_splits(root: Path) -> dict[str, Table]:
    return pick_splits(read_dataset_dir(root), str(root))


def pick_splits(found: dict[str, Table], root: str) -> dict[str, Table]:
    """train / dev / test out of a dataset's split names (validation_matched is dev, ...)."""
    tables = {}
    for split, names in SPLIT_FILE_NAMES.items():
        name = next((n for n in names if n in found), None)
        if name is None:
            if split == "dev" or (split == "test" and any(n in found for n in SPLIT_FILE_NAMES["dev"])):
                continue  # a dataset with train + validation only (BoolQ, SQuAD): validation is the test set
            raise DataError(f"{root}: no '{split}' split (splits: {', '.join(found)}); expected {LAYOUT_HINT}")
        tables[split] = found[name]
    return tables
