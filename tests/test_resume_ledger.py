"""Releases are made once: a resume re-applies the ledger past the last checkpoint and never recomputes it.

Kills are simulated in-process by raising ``Killed`` (a BaseException nothing catches) at an
exact point: after the ledger row of a given step, or halfway through writing a checkpoint or a
ledger row. Every write of the run is synced as it happens, so what is on disk is what a SIGKILL
there would leave (a subprocess SIGKILL is tested in test_train_cli.py). The uninterrupted
reference runs with ``--noise-seed`` so that both runs draw the same batches and noise.
"""

from __future__ import annotations

import json
import os
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.privacy import NotPrivateWarning, epsilon_spent
from dpzo_engine.run import journal
from dpzo_engine.run import run_dir as run_dir_module
from dpzo_engine.run.run_dir import RunDir
from dpzo_engine.run.session import Session
from dpzo_engine.train import main as train_main

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::dpzo_engine.privacy.NotPrivateWarning"),
]

STEPS, SAVE_EVERY = 12, 5


class Killed(BaseException):
    """The process dies here: nothing after it runs, no handler sees it."""


def args(assets, out: Path, *extra: str) -> list[str]:
    model_dir, data_dir = assets
    return [
        "--model", str(model_dir), "--task", "local", "--data-dir", str(data_dir), "--trainable", "all",
        "--max-length", "16", "--batch-size", "8", "--steps", str(STEPS), "--num-directions", "2",
        "--lr", "0.05", "--log-every", "2", "--save-every", str(SAVE_EVERY), "--eval-batch-size", "32",
        "--max-eval-examples", "16", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "model").glob("*.safetensors")))


def ledger_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]


def same_model(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_after_ledger_row(monkeypatch, step: int) -> None:
    """Kill right after the ledger row of ``step`` is on disk."""
    original = RunDir.log_ledger

    def log_then_die(self, row):
        original(self, row)
        if row.get("type") == "step" and row["step"] == step:
            raise Killed

    monkeypatch.setattr(RunDir, "log_ledger", log_then_die)


def resume(out: Path, *extra: str) -> int:
    """``--resume --output-dir RUN`` alone: the run's own config.json supplies everything else."""
    return train_main(["--resume", "--output-dir", str(out), *extra])


@pytest.fixture(scope="module")
def whole(assets, tmp_path_factory) -> Path:
    """The uninterrupted reference run (one thread, as the tests: the CPU forward's sums depend on it)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotPrivateWarning)
            assert train_main(args(assets, out, "--noise-seed", "7")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("kill_step", [3, 8], ids=["before-first-checkpoint", "between-checkpoints"])
def test_kill_then_resume_replays_the_ledger(assets, tmp_path, monkeypatch, whole, kill_step, capsys):
    out = tmp_path / "run"
    kill_after_ledger_row(monkeypatch, kill_step)
    with pytest.raises(Killed):
        train_main(args(assets, out, "--noise-seed", "7"))
    monkeypatch.undo()
    has_checkpoint = kill_step > SAVE_EVERY
    assert (out / "checkpoint" / "LATEST").exists() == has_checkpoint
    before = (out / "ledger.jsonl").read_text()
    capsys.readouterr()
    assert resume(out) == 0
    err = capsys.readouterr().err
    replayed = kill_step - (SAVE_EVERY if has_checkpoint else 0)
    assert f"at step {kill_step}: {replayed} released steps re-applied" in err
    after = (out / "ledger.jsonl").read_text()
    assert after.startswith(before)  # append-only: nothing released was rewritten
    assert after == (whole / "ledger.jsonl").read_text()  # one header, every step once, same values
    assert sum(r["type"] == "header" for r in ledger_rows(out)) == 1
    assert same_model(out, whole)


def test_kill_during_the_checkpoint_write(assets, tmp_path, monkeypatch, whole):
    """Half a state.pt of step 10 on disk: the resume takes the step-5 checkpoint and replays 6..10."""
    out = tmp_path / "run"
    original = run_dir_module.atomic_torch_save

    def half_then_die(obj, path):
        if "0000010" in str(path):
            tmp = path.with_name(path.name + ".tmp")
            torch.save(obj, tmp)
            os.truncate(tmp, tmp.stat().st_size // 2)
            raise Killed
        return original(obj, path)

    monkeypatch.setattr(run_dir_module, "atomic_torch_save", half_then_die)
    with pytest.raises(Killed):
        train_main(args(assets, out, "--noise-seed", "7"))
    monkeypatch.undo()
    assert (out / "checkpoint" / "LATEST").read_text().strip() == "step-0000005"
    assert resume(out) == 0
    assert (out / "ledger.jsonl").read_text() == (whole / "ledger.jsonl").read_text()
    assert same_model(out, whole)


def noisy_forward(monkeypatch) -> list[int]:
    """Make every training forward nondeterministic (as GPU kernels can be); returns a call counter."""
    calls = [0]
    original = SequenceClassificationHead.per_example_loss

    def jittered(self, model, batch):
        calls[0] += 1
        losses = original(self, model, batch)
        jitter = torch.frombuffer(bytearray(os.urandom(4 * losses.numel())), dtype=torch.int32).double()
        return losses + 1e-3 * jitter.to(losses.dtype) / 2**31

    monkeypatch.setattr(SequenceClassificationHead, "per_example_loss", jittered)
    return calls


def test_a_nondeterministic_forward_after_the_resume_changes_no_released_value(assets, tmp_path, monkeypatch, whole):
    """Killed after the last release, before the model is saved: the resume must replay all 12 steps
    from the ledger. With a forward that now gives different losses every call, recomputing any of
    them would change its released values; the ledger and the final model must be the original's."""
    out = tmp_path / "run"
    monkeypatch.setattr(Session, "finalize", lambda self, run, elapsed: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        train_main(args(assets, out, "--noise-seed", "7"))
    monkeypatch.undo()
    calls = noisy_forward(monkeypatch)
    before = (out / "ledger.jsonl").read_text()
    assert resume(out) == 0
    assert calls[0] == 0  # no training forward at all
    assert (out / "ledger.jsonl").read_text() == before == (whole / "ledger.jsonl").read_text()
    assert same_model(out, whole)


def test_released_rows_keep_their_values_when_later_steps_change(assets, tmp_path, monkeypatch, whole):
    """Killed after step 8, resumed with the nondeterministic forward: rows 1..8 stay the original's;
    rows 9..12 are new computations (and differ, which shows the forward really is nondeterministic)."""
    out = tmp_path / "run"
    kill_after_ledger_row(monkeypatch, 8)
    with pytest.raises(Killed):
        train_main(args(assets, out, "--noise-seed", "7"))
    monkeypatch.undo()
    calls = noisy_forward(monkeypatch)
    assert resume(out) == 0
    assert calls[0] > 0
    ours, theirs = ledger_rows(out), ledger_rows(whole)
    assert ours[:9] == theirs[:9]  # header + steps 1..8
    assert [r["step"] for r in ours[1:]] == list(range(1, STEPS + 1))
    assert all(a["released"] != b["released"] for a, b in zip(ours[9:], theirs[9:]))


def test_a_row_cut_after_its_released_values_counts_and_is_redone_with_fresh_draws(assets, tmp_path, monkeypatch):
    """The kill cuts step 6's row after ``"released"`` began: that release is counted (a void row),
    and step 6 is redone at the next secret address. ε covers 13 releases."""
    out = tmp_path / "run"
    original = journal.append

    def cut_then_die(path, row, previous):
        if row.get("type") == "step" and row["step"] == 6:
            data = json.dumps(row)
            cut = data.index('"released"') + len('"released": [0.')
            with open(path, "a") as f:
                f.write(data[:cut])
            raise Killed
        return original(path, row, previous)

    monkeypatch.setattr(journal, "append", cut_then_die)
    with pytest.raises(Killed):
        train_main(args(assets, out))  # a private run: secret key from OS entropy
    monkeypatch.undo()
    torn = (out / "ledger.jsonl").read_text().splitlines()[-1]
    assert '"released"' in torn and not torn.endswith("}")
    assert resume(out) == 0
    rows = ledger_rows(out)
    assert [r["type"] for r in rows].count("header") == 1
    assert [r["step"] for r in rows if r["type"] == "step"] == list(range(1, STEPS + 1))
    voids = [r for r in rows if r["type"] == "void"]
    assert [v["step"] for v in voids] == [6]
    summary = json.loads((out / "summary.json").read_text())
    header = rows[0]
    assert summary["releases"] == STEPS + 1
    sigma, q = header["noise_multiplier"], header["sample_rate"]
    # 13 releases (the accountant's grid was sized for a horizon past 12, hence the PRV grid's tolerance)
    assert summary["epsilon_spent"] == pytest.approx(epsilon_spent(sigma, q, STEPS + 1, 1e-5).epsilon, rel=1e-5)
    assert summary["epsilon_spent"] > epsilon_spent(sigma, q, STEPS, 1e-5).epsilon + 0.01
    privacy = json.loads((out / "model" / "privacy.json").read_text())
    assert privacy["steps"] == STEPS + 1 and privacy["epsilon"] == summary["epsilon_spent"]


def test_the_noisy_count_is_drawn_once_and_survives_resumes(assets, tmp_path, monkeypatch):
    extra = ("--count-share", "0.5", "--epsilon", "1", "--noise-seed", "3")
    whole = tmp_path / "whole"
    assert train_main(args(assets, whole, *extra)) == 0
    out = tmp_path / "run"
    kill_after_ledger_row(monkeypatch, 3)
    with pytest.raises(Killed):
        train_main(args(assets, out, *extra))
    monkeypatch.undo()

    def no_second_count(*a, **k):
        raise AssertionError("a resume drew the noisy count again")

    monkeypatch.setattr("dpzo_engine.privacy.plan.laplace_count", no_second_count)
    assert resume(out) == 0
    assert (out / "ledger.jsonl").read_text() == (whole / "ledger.jsonl").read_text()
    assert same_model(out, whole)


def test_the_ctrl_c_hint_is_a_command_that_works(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a run dir"  # a space: the hint must quote it
    original = Session.save_checkpoint

    def save_then_interrupt(self, run, step):
        original(self, run, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "save_checkpoint", save_then_interrupt)
    capsys.readouterr()
    assert train_main(args(assets, out, "--noise-seed", "7")) == 130
    monkeypatch.undo()
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    command = shlex.split(hint.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "dpzo_engine.train"]
    assert train_main(command[3:]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def test_resume_of_a_run_killed_before_its_first_step_starts_it_again(assets, tmp_path, monkeypatch):
    """Killed while evaluating the untrained model: the run exists (header, then config.json: the run
    directory's commit, docs/run-directory.md) and has released nothing but its header."""
    out = tmp_path / "run"
    monkeypatch.setattr(Session, "evaluate", lambda self, *a: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        train_main(args(assets, out))
    monkeypatch.undo()
    assert (out / "config.json").exists() and [r["type"] for r in ledger_rows(out)] == ["header"]
    assert resume(out) == 0
    rows = ledger_rows(out)
    assert rows[0]["type"] == "header" and len(rows) == STEPS + 1


def test_resume_refuses_a_run_that_is_not_there(tmp_path, capsys):
    assert resume(tmp_path / "nothing") == 2
    assert "holds no run" in capsys.readouterr().err


def test_a_stage_row_without_its_step_is_not_written_twice(assets, tmp_path, monkeypatch):
    """DP-ZOSO writes a stage row before the step that opens the stage. Killed between the two, the
    resume recomputes that step (nothing of it was released) but must not append the stage row again."""
    extra = ("--method", "dp-zoso", "--stages", "2", "--noise-seed", "7")
    whole = tmp_path / "whole"
    assert train_main(args(assets, whole, *extra)) == 0
    boundary = next(r["step"] for r in ledger_rows(whole) if r["type"] == "stage" and r["step"] > 1)
    out = tmp_path / "run"
    original = RunDir.log_ledger

    def die_after_stage_row(self, row):
        original(self, row)
        if row["type"] == "stage" and row["step"] == boundary:
            raise Killed

    monkeypatch.setattr(RunDir, "log_ledger", die_after_stage_row)
    with pytest.raises(Killed):
        train_main(args(assets, out, *extra))
    monkeypatch.undo()
    assert ledger_rows(out)[-1]["type"] == "stage"
    assert resume(out) == 0
    assert (out / "ledger.jsonl").read_text() == (whole / "ledger.jsonl").read_text()
    assert same_model(out, whole)
