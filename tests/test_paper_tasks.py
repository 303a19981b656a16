"""The papers' tasks on small fixtures in each layout: LM-BFF k-shot (data seeds), GLUE with an
unlabelled test file, SuperGLUE JSONL (BoolQ, CB), SQuAD (official JSON, rows, save_to_disk),
the hub (stubbed), MeZO's 1000-example sampling, test caps, and the error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpzo_engine.data import DataError, Example, get_task
from dpzo_engine.data import tasks as tasks_mod
from dpzo_engine.data.prompts import BOOLQ, CB, NLI3, RTE, SENTIMENT2, SQUAD


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sst2_rows(n: int, tag: str, header: str = "sentence\tlabel") -> str:
    rows = [header] + [f"{tag} {'great' if i % 2 else 'dull'} film {i}\t{i % 2}" for i in range(n)]
    return "\n".join(rows) + "\n"


def jsonl(records: list[dict]) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


# ----------------------------------------------------------------------------- LM-BFF and GLUE


def test_lmbff_kshot_data_seeds_and_test_cap(tmp_path):
    root = tmp_path / "k-shot" / "SST-2"
    for seed in (13, 21, 42, 87, 100):
        d = root / f"16-{seed}"
        write(d / "train.tsv", sst2_rows(32, f"train{seed}"))
        write(d / "dev.tsv", sst2_rows(32, f"dev{seed}"))
        write(d / "test.tsv", sst2_rows(1200, "test"))  # LM-BFF's test: the original dev set
    tasks = {seed: get_task("sst-2", data_dir=root, seed=seed, k_shot=16) for seed in (13, 21, 42, 87, 100)}
    for seed, task in tasks.items():
        assert task.train[0].text.startswith(f"train{seed} ") and len(task.train) == 32 and len(task.dev) == 32
        assert len(task.test) == 1000 and task.test == tasks[13].test  # capped at 1,000, same for every seed
        assert task.prompt is SENTIMENT2
    assert len(get_task("sst-2", data_dir=root, seed=13, k_shot=16, max_test=1200).test) == 1200
    with pytest.raises(DataError, match=r"no 16-7/ sample directory.*16-100, 16-13, 16-21, 16-42, 16-87"):
        get_task("sst-2", data_dir=root, seed=7, k_shot=16)


def test_glue_layout_unlabelled_test_uses_dev_and_mezo_sampling(tmp_path):
    write(tmp_path / "train.tsv", sst2_rows(300, "tr"))
    write(tmp_path / "dev.tsv", sst2_rows(40, "dv"))
    write(tmp_path / "test.tsv", "index\tsentence\n" + "".join(f"{i}\tunlabelled {i}\n" for i in range(50)))
    kshot = get_task("sst-2", data_dir=tmp_path, seed=42, k_shot=8)
    assert [e.text for e in kshot.test] == [f"dv {'great' if i % 2 else 'dull'} film {i}" for i in range(40)]
    assert kshot.describe()["class_counts"]["train"] == [8, 8] and kshot.describe()["class_counts"]["dev"] == [8, 8]
    assert "labelled dev split" in kshot.source
    mezo = get_task("sst-2", data_dir=tmp_path, seed=0, num_train=100, num_dev=50)  # MeZO: random, unbalanced
    assert (len(mezo.train), len(mezo.dev), len(mezo.test)) == (100, 50, 40)
    assert not {e.text for e in mezo.train} & {e.text for e in mezo.dev}
    assert get_task("sst-2", data_dir=tmp_path, seed=0, num_train=100, num_dev=50).train == mezo.train
    assert get_task("sst-2", data_dir=tmp_path, seed=1, num_train=100, num_dev=50).train != mezo.train
    with pytest.raises(DataError, match=r"k_shot .* or num_train .*, not both"):
        get_task("sst-2", data_dir=tmp_path, k_shot=8, num_train=100)
    with pytest.raises(DataError, match="cannot give 500 dev examples"):
        get_task("sst-2", data_dir=tmp_path, num_train=100)


def test_rte_and_mnli_templates_follow_lmbff(tmp_path):
    rows = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tThe premise {i}.\tHypothesis {i}\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(20)
    ]
    for name in ("train.tsv", "dev.tsv"):
        write(tmp_path / name, "\n".join(rows) + "\n")
    write(tmp_path / "test.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n")
    rte = get_task("rte", data_dir=tmp_path, k_shot=4)
    assert rte.prompt is RTE and rte.is_pair and rte.label_names == ("entailment", "not_entailment")
    assert len(rte.test) == 20
    assert get_task("snli", data_dir=tmp_path, label_names=["entailment", "not_entailment"]).prompt is NLI3


# ----------------------------------------------------------------------------- SuperGLUE (MeZO's OPT tasks)


def boolq_records(n: int, tag: str, labelled: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"question": f"is {tag} number {i} even", "passage": f"{tag} passage {i}.", "idx": i}
        if labelled:
            rec["label"] = i % 2 == 0
        out.append(rec)
    return out


def test_superglue_boolq_jsonl_with_boolean_labels(tmp_path):
    write(tmp_path / "train.jsonl", jsonl(boolq_records(60, "tr")))
    write(tmp_path / "val.jsonl", jsonl(boolq_records(12, "va")))
    write(tmp_path / "test.jsonl", jsonl(boolq_records(5, "te", labelled=False)))
    task = get_task("boolq", data_dir=tmp_path, seed=0, num_train=30, num_dev=10)
    assert task.prompt is BOOLQ and task.label_names == ("false", "true")
    assert (len(task.train), len(task.dev), len(task.test)) == (30, 10, 12)
    first = task.test[0]
    assert first == Example("va passage 0.", 1, "is va number 0 even")  # True -> "true" -> class 1
    with pytest.raises(DataError, match="cannot give 500 dev examples"):  # the MeZO default needs more data
        get_task("boolq", data_dir=tmp_path)


def test_superglue_cb_and_hub_style_save_to_disk(tmp_path):
    names = ["entailment", "contradiction", "neutral"]
    recs = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": names[i % 3], "idx": i} for i in range(40)]
    write(tmp_path / "cb" / "train.jsonl", jsonl(recs))
    write(tmp_path / "cb" / "val.jsonl", jsonl(recs[:9]))
    cb = get_task("cb", data_dir=tmp_path / "cb", seed=0, num_dev=10)  # all 40 used: 30 train + 10 dev
    assert cb.prompt is CB and (len(cb.train), len(cb.dev), len(cb.test)) == (30, 10, 9)
    assert cb.test[1].label == 1 and cb.prompt.label_words[1] == "No"

    datasets = pytest.importorskip("datasets")
    part = {"question": ["q1", "q2", "q3", "q4"], "passage": ["a", "b", "c", "d"], "answer": [True, False] * 2}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(part), "validation": datasets.Dataset.from_dict(part)}
    )
    dd.save_to_disk(str(tmp_path / "boolq"))  # google/boolq: train + validation, label column "answer"
    boolq = get_task("boolq", data_dir=tmp_path / "boolq", num_train=2, num_dev=1)
    assert len(boolq.test) == 4 and [e.label for e in boolq.test] == [1, 0, 1, 0]


# ----------------------------------------------------------------------------- SQuAD


def squad_nested(n: int, tag: str) -> dict:
    qas = [
        {
            "id": f"{tag}{i}",
            "question": f"Where is {tag} {i}?",
            "answers": [{"text": f"place {i}", "answer_start": 0}] * 2,
        }
        for i in range(n)
    ]
    qas.append({"id": "unanswerable", "question": "Why?", "answers": [], "is_impossible": True})
    return {
        "version": "1.1",
        "data": [{"title": "Some_Title", "paragraphs": [{"context": f"{tag} context.", "qas": qas}]}],
    }


def squad_rows(n: int, tag: str) -> list[dict]:
    return [
        {"id": str(i), "title": "T", "context": f"{tag} ctx {i}", "question": f"q {i}?",
         "answers": {"text": [f"a{i}", f"alt{i}"], "answer_start": [0, 0]}}
        for i in range(n)
    ]  # fmt: skip


def test_squad_official_json_rows_and_save_to_disk(tmp_path):
    write(tmp_path / "official" / "train-v1.1.json", json.dumps(squad_nested(30, "tr")))
    write(tmp_path / "official" / "dev-v1.1.json", json.dumps(squad_nested(1200, "dv")))
    task = get_task("squad", data_dir=tmp_path / "official", seed=0, num_train=20, num_dev=5)
    assert task.is_generation and task.prompt is SQUAD and task.label_names == ()
    assert task.max_length == 512  # the default --max-length: passages are long
    assert (len(task.train), len(task.dev), len(task.test)) == (20, 5, 1000)  # unanswerable dropped; test capped
    e = task.test[0]
    assert e.answers == (e.text_pair.replace("Where is dv ", "place ").rstrip("?"),)  # duplicates folded
    assert e.title == "Some Title" and e.label == -1 and e.text == "dv context."
    assert task.describe()["class_counts"] == {"train": [], "dev": [], "test": []}

    write(tmp_path / "rows" / "train.jsonl", jsonl(squad_rows(30, "tr")))
    write(tmp_path / "rows" / "validation.jsonl", jsonl(squad_rows(7, "va")))
    rows = get_task("squad", data_dir=tmp_path / "rows", num_train=20, num_dev=5)
    assert rows.test[2] == Example("va ctx 2", -1, "q 2?", ("a2", "alt2"), "T")
    again = get_task("squad", data_dir=tmp_path / "rows", num_train=20, num_dev=5)
    assert again.fingerprint() == rows.fingerprint()

    datasets = pytest.importorskip("datasets")
    records = squad_rows(10, "ds")
    columns = {k: [r[k] for r in records] for k in records[0]}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(columns), "validation": datasets.Dataset.from_dict(columns)}
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    from_disk = get_task("squad", data_dir=tmp_path / "ds", num_train=6, num_dev=2)
    assert len(from_disk.test) == 10 and from_disk.test[0].answers == ("a0", "alt0")


def test_squad_errors_name_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"no train-v1\.1\.json / train\.jsonl / train\.json file .* expected"):
        get_task("squad", data_dir=tmp_path)
    write(tmp_path / "train.jsonl", jsonl([{"context": "c", "question": "q"}]))
    write(tmp_path / "dev.jsonl", jsonl([{"context": "c", "question": "q"}]))
    with pytest.raises(DataError, match=r"train\.jsonl: missing column 'answers'"):
        get_task("squad", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"task 'squad' reads local files: pass --data-dir.*hub is offline"):
        get_task("squad")
    with pytest.raises(DataError, match="has no classes: use num_train"):
        get_task("squad", data_dir=tmp_path, k_shot=4)


# ----------------------------------------------------------------------------- the hub, the cache


def test_hub_datasets_when_online(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None):
        calls.append((path, name))
        if path == "CogComp/trec":
            label = datasets.ClassLabel(names=["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"])
            feats = datasets.Features({"text": datasets.Value("string"), "coarse_label": label})
            part = datasets.Dataset.from_dict(
                {"text": [f"q{i}" for i in range(24)], "coarse_label": [i % 6 for i in range(24)]}, features=feats
            )
            return datasets.DatasetDict({"train": part, "test": part})
        label = datasets.ClassLabel(names=["negative", "positive"])
        feats = datasets.Features({"sentence": datasets.Value("string"), "label": label})
        train = datasets.Dataset.from_dict(
            {"sentence": [f"s{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}, features=feats
        )
        test = datasets.Dataset.from_dict({"sentence": ["x"], "label": [-1]})  # GLUE's unlabelled test
        return datasets.DatasetDict({"train": train, "validation": train.select(range(6)), "test": test})

    monkeypatch.setattr(tasks_mod, "hub_offline", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    sst2 = get_task("sst-2", k_shot=4)
    assert calls[-1] == ("nyu-mll/glue", "sst2") and len(sst2.test) == 6 and sst2.source.startswith("nyu-mll/glue")
    trec = get_task("trec", k_shot=2)
    assert trec.label_names[2] == "abbreviation" and {e.text: e.label for e in trec.test}["q0"] == 2  # ABBR
    assert trec.test[2].label == 0  # DESC -> description

    def broken(path, name=None):
        raise ConnectionError("no route to host\nmore")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(DataError, match=r"cannot load nyu-mll/glue from the HuggingFace hub \(no route to host\)"):
        get_task("sst-2")


def test_offline_without_data_dir_names_the_layout():
    with pytest.raises(DataError, match=r"task 'mnli' reads local files: .*k-shot/MNLI/<k>-<seed>/.*offline"):
        get_task("mnli")
    with pytest.raises(DataError, match=r"task 'boolq' reads local files: .*SuperGLUE JSONL"):
        get_task("boolq")


def test_snli_sdist_found_in_the_cache(tmp_path, monkeypatch):
    from test_data import make_snli_sdist

    cache = tmp_path / "cache"
    cache.mkdir()
    make_snli_sdist(cache)
    monkeypatch.setenv("DPZO_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    task = get_task("snli", k_shot=5, dev_per_class=2, max_test=9)
    assert task.source == str(cache / tasks_mod.SNLI_SDIST) and len(task.train) == 15
    with pytest.raises(DataError, match="draws balanced splits per class: use k_shot"):
        get_task("snli", num_train=10)
