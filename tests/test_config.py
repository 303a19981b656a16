"""The configuration: TrainConfig as the one source of flags, config-file coercion, bad types.

Issue 12 item 5 and issue 13 item 5: wrong types in a config file or on the command line end
with one ``error:`` line naming the key and exit code 2, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpzo_engine.core.errors import ConfigError
from dpzo_engine.run import options
from dpzo_engine.run.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DIRECTIONS,
    DEFAULT_LR,
    GROUPS,
    README_BEGIN,
    README_END,
    STAGE_DEFAULTS,
    TrainConfig,
    build_parser,
    flag_reference,
    parse_args,
    validate,
)
from dpzo_engine.run.options import option
from dpzo_engine.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]

# (file text, key the error must name): the reproductions of issue 12 item 5, in YAML and JSON
BAD_YAML = [
    ('eval_every: "x"', "eval_every"),
    ('seed: "abc"', "seed"),
    ("trainable: 5", "trainable"),
    ("model: null", "model"),
    ("task: [1, 2]", "task"),
    ("output_dir: 5", "output_dir"),
    ("seed: 18446744073709551616", "seed"),
    ("resume: 3", "resume"),
    ("method: sgd", "method"),
    ("lr: abc", "lr"),
    ("steps: 2.5", "steps"),
    ("num_directions: true", "num_directions"),
    ("learning_rate: 0.1", "learning_rate"),
]


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = train_main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(("text", "key"), BAD_YAML)
def test_bad_yaml_values_give_one_error_line_naming_the_key(tmp_path, capsys, text, key):
    (tmp_path / "c.yaml").write_text(text + "\n")
    out = tmp_path / "run"
    code, err = run_main(["--config", str(tmp_path / "c.yaml"), "--output-dir", str(out)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and key in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    ("data", "key"),
    [({"eval_every": "x"}, "eval_every"), ({"seed": "abc"}, "seed"), ({"model": None}, "model"),
     ({"task": [1, 2]}, "task"), ({"output_dir": 5}, "output_dir"), ({"trainable": 5}, "trainable")],
)  # fmt: skip
def test_bad_json_values_give_one_error_line_naming_the_key(tmp_path, capsys, data, key):
    (tmp_path / "c.json").write_text(json.dumps(data))
    code, err = run_main(["--config", str(tmp_path / "c.json"), "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and key in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--seed", "18446744073709551616"], "--seed"), (["--seed", "abc"], "--seed"), (["--seed", "-1"], "--seed"),
     (["-K", "x"], "--num-directions"), (["--lr", "1e-3x"], "--lr"), (["--method", "sgd"], "--method"),
     (["--noise-seed", "18446744073709551616"], "--noise-seed"), (["--steps", "1e40"], "--steps"),
     (["--no-such-flag"], "--no-such-flag"), (["--steps"], "--steps")],
)  # fmt: skip
def test_bad_flags_give_one_error_line_naming_the_flag(tmp_path, capsys, argv, flag):
    code, err = run_main([*argv, "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and flag in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--device", "tpu"], "--device"), (["--device", ""], "--device"), (["--device", "cuda:x"], "--device"),
     (["--output-dir", ""], "--output-dir"), (["--model", ""], "--model"), (["--data-dir", ""], "--data-dir"),
     (["--trainable", ""], "--trainable")],
)  # fmt: skip
def test_values_no_run_can_use_are_refused_before_anything_loads(tmp_path, capsys, monkeypatch, argv, flag):
    """An unknown device was a RuntimeError traceback once the data had loaded; an empty --output-dir (or
    --data-dir) silently meant the current directory, so a run was written into wherever the user stood."""
    monkeypatch.chdir(tmp_path)
    out = [] if flag == "--output-dir" else ["--output-dir", str(tmp_path / "run")]
    code, err = run_main([*argv, *out], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and flag in err[0], err
    assert list(tmp_path.iterdir()) == []
    name = flag[2:].replace("-", "_")
    (tmp_path / "c.yaml").write_text(f"{name}: {argv[1]!r}\n")  # the same value from a config file
    with pytest.raises(ConfigError, match=f"{name}|{flag}"):
        parse_args(["--config", str(tmp_path / "c.yaml")])


def test_help_is_grouped_and_exits_0(capsys):
    """``--help`` through the entry point: the flags in their argument groups, in GROUPS' order, on stdout."""
    with pytest.raises(SystemExit) as exit_:
        train_main(["--help"])
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("usage: python -m dpzo_engine.train")
    titles = [line[:-1] for line in captured.out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options", *GROUPS.values()]


def test_huge_seed_in_a_subprocess_has_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = ["--seed", "18446744073709551616", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "dpzo_engine.train", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "--seed" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout


def test_yaml_values_are_coerced_to_the_fields_types(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) and 1e3 as strings; JSON writes 100.0 for integers."""
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nzo-eps: 1e-4\nsteps: 1e3\nepsilon: 3\nresume: false\ndata_dir: null\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and cfg.zo_eps == 1e-4
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    assert cfg.epsilon == 3.0 and isinstance(cfg.epsilon, float) and cfg.data_dir is None
    (tmp_path / "c.json").write_text(json.dumps({"steps": 100.0, "seed": "7", "max-length": 32}))
    cfg = parse_args(["--config", str(tmp_path / "c.json")])
    assert (cfg.steps, cfg.seed, cfg.max_length) == (100, 7, 32)
    assert parse_args(["--seed", str(2**64 - 1)]).seed == 2**64 - 1  # the largest seed the stream takes


def test_flags_win_over_the_file_and_the_file_over_the_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 7\nlr: 0.2\nnum-directions: 3\n")
    cfg = parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.3"])
    assert (cfg.steps, cfg.lr, cfg.num_directions, cfg.epsilon) == (7, 0.3, 3, TrainConfig().epsilon)
    assert parse_args(["--config", str(tmp_path / "c.yaml"), "-K", "5"]).num_directions == 5


def test_a_config_built_in_python_gets_the_same_checks():
    with pytest.raises(ConfigError, match="--seed must be an integer"):
        validate(TrainConfig(seed="abc"))
    with pytest.raises(ConfigError, match="--method must be one of"):
        validate(TrainConfig(method="sgd"))
    with pytest.raises(ConfigError, match="--model must be a string, got null"):
        validate(TrainConfig(model=None))
    cfg = validate(TrainConfig(lr="1e-3", steps=10.0))
    assert cfg.lr == 1e-3 and cfg.steps == 10 and isinstance(cfg.steps, int)


@pytest.mark.parametrize(
    "method, given, needle",
    [
        ("dp-aggzo", {"weight_decay": 0.1}, "--weight-decay applies to --method dp-adamw or adamw only"),
        ("mezo", {"opacus_mode": "ghost"}, "--opacus-mode applies to --method dp-adamw"),
        ("dp-zoso", {"physical_batch_size": 8}, "--physical-batch-size applies to --method dp-adamw or adamw"),
        ("dp-adamw", {"num_directions": 64}, "--num-directions applies to the zeroth-order methods"),
        ("adamw", {"zo_eps": 1e-2}, "--zo-eps applies to the zeroth-order methods"),
        ("dp-adamw", {"difference": "forward"}, "--difference applies to the zeroth-order methods"),
        ("dp-adamw", {"direction_kind": "rademacher"}, "--direction-kind applies to the zeroth-order methods"),
        ("adamw", {"direction_cache_gb": 1.0}, "--direction-cache-gb applies to the zeroth-order methods"),
    ],
)
def test_a_flag_the_method_would_ignore_is_refused(method, given, needle):
    """Issue 12's open point: --weight-decay under DP-AggZO (or -K under DP-AdamW) was accepted and silently
    ignored; a user who set it believes it acted."""
    with pytest.raises(ConfigError, match=needle):
        validate(TrainConfig(method=method, **given))
    validate(TrainConfig(method=method))  # the defaults themselves are fine


def test_defaults_that_depend_on_other_values_resolve_in_one_place():
    assert validate(TrainConfig()).num_directions == DEFAULT_DIRECTIONS["dp-aggzo"]
    assert validate(TrainConfig(method="dpzero")).num_directions == 1
    assert validate(TrainConfig(method="mezo")).lr == DEFAULT_LR["zo"]
    assert validate(TrainConfig(method="adamw")).lr == DEFAULT_LR["first_order"]
    assert validate(TrainConfig()).batch_size == DEFAULT_BATCH_SIZE
    assert validate(TrainConfig(sample_rate=0.1)).batch_size is None
    zopo = validate(TrainConfig(method="dp-zopo", steps=70))
    assert {k: getattr(zopo, k) for k in STAGE_DEFAULTS} == STAGE_DEFAULTS
    assert zopo.zo_scale_start == zopo.zo_eps == zopo.zo_scale_end
    zoso = validate(TrainConfig(method="dp-zoso", steps=70))
    assert zoso.stages == STAGE_DEFAULTS["stages"] and zoso.keep_fraction is None  # no mask: stays unset
    plain = validate(TrainConfig()).stage_options()  # StageOptions' defaults are STAGE_DEFAULTS too
    assert plain.stages is None and plain.keep_fraction == STAGE_DEFAULTS["keep_fraction"]


def test_every_field_is_a_grouped_flag_with_help():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    declared = options.flags(TrainConfig)
    assert {f.name for f in declared} == fields
    assert all(f.help and f.group in GROUPS for f in declared)
    text = build_parser().format_help()
    for title in GROUPS.values():
        assert f"\n{title}:\n" in text
    for f in declared:
        assert f.flag in text
    assert "-K N, --num-directions N" in text and "--config FILE" in text
    assert "{dp-aggzo,dpzero," in text  # choices= is shown (and enforced) by argparse


def test_identity_leaves_out_bookkeeping():
    ident = TrainConfig().identity()
    for name in ("output_dir", "resume", "eval_every", "log_every", "save_every", "eval_batch_size", "device"):
        assert name not in ident
    assert {"method", "lr", "seed", "epsilon", "max_eval_examples"} <= set(ident)


def test_readme_flag_table_is_generated_from_the_dataclass():
    readme = (ROOT / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme
    block = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block.strip() == flag_reference().strip(), (
        "README's flag table is stale: run `python -m dpzo_engine.run.config README.md`"
    )
    for f in options.flags(TrainConfig):
        assert f"`{f.flag}`" in block


def test_option_types_are_limited_to_what_files_and_flags_can_carry():
    @dataclasses.dataclass
    class Bad:
        x: tuple = option((), "a tuple", group="g")

    with pytest.raises(TypeError, match="option types"):
        options.flags(Bad)


@pytest.mark.parametrize(
    "given, needle",
    [
        ({"direction_cache_gb": -1.0}, "--direction-cache-gb must be a finite number >= 0"),
        ({"direction_cache_gb": float("inf")}, "--direction-cache-gb must be a finite number >= 0"),
        ({"direction_cache_gb": 1.0, "direction_kind": "rademacher"}, "Rademacher signs cost less to generate"),
    ],
)
def test_direction_cache_flag_is_checked(given, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(TrainConfig(**given))
    cfg = validate(TrainConfig(direction_cache_gb=0.5))
    assert cfg.zo_options().direction_cache_gb == 0.5
    assert "direction_cache_gb" not in cfg.identity()  # the same bits: a resume may change it
