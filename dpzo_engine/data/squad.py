"""SQuAD (v1.1) as a generation task, MeZO style: 1,000 train and 500 dev questions drawn from
the training set, test = the validation set capped at 1,000; the template is MeZO's
("Title: … / Context: … / Question: … / Answer: …").

Layouts: the official JSON files (``train-v1.1.json`` and ``dev-v1.1.json``, nested
data → paragraphs → qas), flat rows as the hub serves them (``train.jsonl`` and
``validation.jsonl`` / ``dev.jsonl`` with ``context``, ``question``, ``answers`` and optional
``title``; ``answers`` is ``{"text": [...]}`` or a list of strings), a ``save_to_disk``
directory, or ``rajpurkar/squad`` from the hub when it is reachable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.paths import hub_offline
from .loaders import (
    DataError,
    Example,
    Table,
    dataset_tables,
    is_dataset_dir,
    pick_splits,
    read_dataset_dir,
    read_table,
)
from .prompts import SQUAD
from .tasks import TaskData, TaskOptions, cap, random_split, register_task

SQUAD_LAYOUT = (
    "train-v1.1.json + dev-v1.1.json (official SQuAD), train.jsonl + validation.jsonl rows "
    "(context, question, answers, title), or a save_to_disk directory"
)
SPLIT_FILES = {
    "train": ("train-v1.1.json", "train.jsonl", "train.json"),
    "test": ("dev-v1.1.json", "validation.jsonl", "validation.json", "dev.jsonl", "dev.json"),
}
HUB_ID = "rajpurkar/squad"
SQUAD_MAX_LENGTH = 512  # default --max-length: the template with most SQuAD contexts whole (OPT tokens)


def _answers(raw: Any, where: str) -> tuple[str, ...]:
    if isinstance(raw, dict):
        raw = raw.get("text", [])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise DataError(f"{where}: 'answers' must be a list of strings or {{'text': [...]}}, got {type(raw).__name__}")
    texts = [a["text"] if isinstance(a, dict) else a for a in raw]  # official layout: [{"text", "answer_start"}]
    out: list[str] = []
    for t in texts:
        t = " ".join(str(t).split())
        if t and t not in out:
            out.append(t)
    return tuple(out)


def _example(context: Any, question: Any, answers: Any, title: Any, where: str) -> Example | None:
    if not isinstance(context, str) or not isinstance(question, str):
        raise DataError(f"{where}: needs string 'context' and 'question' fields")
    golds = _answers(answers, where)
    if not golds:
        return None  # unanswerable (SQuAD 2.0): MeZO's SQuAD keeps answerable questions only
    title_text = " ".join(str(title).replace("_", " ").split()) if title is not None else ""
    return Example(context.strip(), -1, " ".join(question.split()), golds, title_text)


def _from_nested(data: list, source: str) -> list[Example]:
    out = []
    for article in data:
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for qa in paragraph.get("qas", []):
                where = f"{source}: article '{article.get('title', '?')}' paragraph {p}"
                context, title = paragraph.get("context"), article.get("title")
                ex = _example(context, qa.get("question"), qa.get("answers", []), title, where)
                if ex is not None:
                    out.append(ex)
    return out


def _from_table(table: Table) -> list[Example]:
    cols = table.columns
    missing = [c for c in ("context", "question", "answers") if c not in cols]
    if missing:
        present = ", ".join(cols)
        raise DataError(f"{table.source}: missing column '{missing[0]}' (columns: {present}); expected {SQUAD_LAYOUT}")
    titles = cols.get("title", [None] * table.num_rows)
    out = []
    for i in range(table.num_rows):
        where = f"{table.source} row {i + 1}"
        ex = _example(cols["context"][i], cols["question"][i], cols["answers"][i], titles[i], where)
        if ex is not None:
            out.append(ex)
    return out


def _read_file(path: Path) -> list[Example]:
    text = path.read_text(encoding="utf-8-sig")
    head = text.lstrip()[:1]
    if head == "{" and path.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            return _from_nested(doc["data"], str(path))
    return _from_table(read_table(path))


def _read_dir(root: Path) -> dict[str, list[Example]]:
    if is_dataset_dir(root):
        tables = pick_splits(read_dataset_dir(root), str(root))
        return {"train": _from_table(tables["train"]), "test": _from_table(tables.get("test", tables.get("dev")))}
    splits = {}
    for split, names in SPLIT_FILES.items():
        path = next((root / n for n in names if (root / n).is_file()), None)
        if path is None:
            raise DataError(f"{root}: no {' / '.join(names)} file for the {split} split; expected {SQUAD_LAYOUT}")
        splits[split] = _read_file(path)
    return splits


def _read_hub() -> dict[str, list[Example]]:
    offline = hub_offline()
    if offline:
        raise DataError(
            f"task 'squad' reads local files: pass --data-dir, a directory with {SQUAD_LAYOUT}; "
            f"the HuggingFace hub is offline ({offline}=1)"
        )
    import datasets

    try:
        loaded = datasets.load_dataset(HUB_ID)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"task 'squad': cannot load {HUB_ID} from the hub ({reason}); pass --data-dir") from exc
    tables = pick_splits(dataset_tables(loaded, f"hub:{HUB_ID}"), f"hub:{HUB_ID}")
    return {"train": _from_table(tables["train"]), "test": _from_table(tables.get("test", tables.get("dev")))}


@register_task("squad", "SQuAD v1.1 (MeZO template, generation; 1000/500/1000) from --data-dir or the hub")
def _squad(opts: TaskOptions) -> TaskData:
    if opts.k_shot is not None:
        raise DataError("task 'squad' has no classes: use num_train, not k_shot")
    if opts.data_dir is None:
        splits, source = _read_hub(), f"hub:{HUB_ID}"
    else:
        root = Path(opts.data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"{root} is not a directory; task 'squad' expects {SQUAD_LAYOUT}")
        splits, source = _read_dir(root), str(root)
    for split, examples in splits.items():
        if not examples:
            raise DataError(f"{source}: no answerable questions in the {split} split")
    train, dev = random_split(splits["train"], opts.num_train or 1000, opts.num_dev or 500, opts.seed, "squad")
    test = cap(splits["test"], opts.max_test or 1000)
    return TaskData("squad", (), train, dev, test, prompt=SQUAD, source=source, max_length=SQUAD_MAX_LENGTH)
