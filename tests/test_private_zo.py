"""The Python API (``dpzo_engine.PrivateZO``): a user's model, loss and data; the rules it enforces;
state round trips; the examples in examples/ run as a user would run them."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpzo_engine
from dpzo_engine.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def blobs(n: int = 512, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g)
    x = torch.randn(n, dim, generator=g)
    return x, (x @ w > 0).long()


def make(model: nn.Module, n: int = 512, steps: int = 20, **kw) -> dpzo_engine.PrivateZO:
    """A run with a debug noise seed (reproducible, hence reported as not private) unless noise_seed=None."""
    options = {"num_directions": 4, "clip": 1.0, "lr": 0.2, "backend": "reference", "noise_seed": 7, **kw}
    if options["noise_seed"] is None:
        return dpzo_engine.PrivateZO.make(model, num_examples=n, steps=steps, batch_size=64, epsilon=2.0, **options)
    with pytest.warns(UserWarning, match="NOT differentially private"):  # a debug-only noise seed says so
        return dpzo_engine.PrivateZO.make(model, num_examples=n, steps=steps, batch_size=64, epsilon=2.0, **options)


def ce(model: nn.Module):
    return lambda xb, yb: F.cross_entropy(model(xb), yb, reduction="none")


def test_a_user_loop_trains_and_spends_the_target_epsilon():
    x, y = blobs()
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    zo = make(model, steps=60, noise_seed=None)  # secret noise: the run is private and says what it spent
    before = F.cross_entropy(model(x), y).item()
    steps = [zo.step(ce(model), x[idx], y[idx]) for idx in zo.batches()]
    assert len(steps) == 60 and zo.steps_done == 60
    assert F.cross_entropy(model(x), y).item() < before - 0.1
    assert 1.9 < zo.epsilon() <= 2.0
    assert [r.step for r in steps] == list(range(60))
    assert "dp-aggzo" in repr(zo) and "18 trainable parameters" in repr(zo) and "step 60/60" in repr(zo)


def test_the_api_step_equals_the_engine_parts_driven_by_hand():
    """PrivateZO adds bookkeeping only: the same seeds, noise and update as ZOStep with the same plan."""
    from dpzo_engine.privacy import GaussianMechanism
    from dpzo_engine.privacy.plan import PrivacyPlan
    from dpzo_engine.zo.engine import ZOEngine
    from dpzo_engine.zo.rules import PrivateRule
    from dpzo_engine.zo.stagewise import StageOptions, build_stagewise
    from dpzo_engine.zo.step import ZOStep

    x, y = blobs()
    torch.manual_seed(0)
    a = nn.Linear(8, 2)
    b = nn.Linear(8, 2)
    b.load_state_dict(a.state_dict())
    zo = make(a, steps=5, seed=3)
    with pytest.warns(UserWarning):
        plan = PrivacyPlan.create(512, steps=5, sample_rate=64 / 512, epsilon=2.0, delta=1e-5, noise_seed=7)
    flat = dpzo_engine.FlatParams(b)
    engine = ZOEngine(flat, backend="reference")
    rule = PrivateRule(GaussianMechanism(plan.noise_multiplier, 1.0, 4, "joint", plan.generator), plan.normalizer)
    step = ZOStep(engine, rule, build_stagewise(StageOptions(5, 0.2, 1e-3, seed=3), b, flat, engine), 3, 4, "nearest")
    for t in range(5):
        idx_a, idx_b = zo.sample(), plan.sampler.sample().tolist()
        assert idx_a == idx_b
        ra = zo.step(ce(a), x[idx_a], y[idx_a])
        rb = step(t, (lambda i=idx_b: ce(b)(x[i], y[i])) if idx_b else None)
        assert ra.seeds == rb.seeds and ra.coefs == rb.coefs
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_an_empty_batch_releases_noise_without_calling_the_loss():
    model = nn.Linear(8, 2)
    zo = make(model, n=1000, steps=3, noise_seed=None)
    zo.plan.sampler.sample_rate = 1e-9  # every batch empty
    calls = []
    before = [p.detach().clone() for p in model.parameters()]
    for idx in zo.batches():
        assert idx == []
        rec = zo.step(lambda: calls.append(1))
        assert rec.loss is None and len(rec.released.grad) == 4
    assert not calls and zo.steps_done == 3 and zo.epsilon() > 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # pure noise moved θ


BAD_USE = [
    ("step without a batch", lambda zo, m, x, y: zo.step(ce(m), x, y), "needs a batch from sample()"),
    ("two samples", lambda zo, m, x, y: (zo.sample(), zo.sample()), "sample() called again before step()"),
    ("mean loss", lambda zo, m, x, y: zo.step(lambda i: F.cross_entropy(m(x[i]), y[i]), zo.sample()),
     "one loss per example"),
    ("wrong length", lambda zo, m, x, y: zo.step(lambda i: F.cross_entropy(m(x), y, reduction="none"), zo.sample()),
     "one loss per example ["),
    ("training mode", lambda zo, m, x, y: (m.train(), zo.step(ce(m), x, y)), "training mode"),
    ("batches without a step", lambda zo, m, x, y: [None for _ in zo.batches()], "exactly one step()"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "misuse", "needle"), BAD_USE, ids=[b[0] for b in BAD_USE])
def test_misuse_is_refused_with_one_clear_message(name, misuse, needle):
    x, y = blobs()
    model = nn.Linear(8, 2)
    zo = make(model, steps=3)
    if name == "training mode":
        zo.sample()
    with pytest.raises(ConfigError, match=re.escape(needle)):
        misuse(zo, model, x, y)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"lr_rate": 0.1}, "unknown option 'lr_rate'"),
        ({"batch_size": 10_000}, "batch_size must be in"),
        ({"method": "sgd"}, "method must be one of"),
        ({"epsilon": None}, "method dp-aggzo is private: give epsilon, or method='mezo'"),
        # every ZOOptions field, under its own name, when the run is made (not at the first step, or never)
        ({"num_directions": 10**6}, "num_directions must be an integer in [1, 4095]"),
        ({"num_directions": 2.5}, "num_directions must be an integer in [1, 4095]"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"zo_eps": 0.0}, "zo_eps must be a finite number > 0"),
        ({"clip": float("inf")}, "clip must be a finite number > 0"),
        ({"difference": "backward"}, "difference must be one of central, forward"),
        ({"direction_kind": "uniform"}, "direction_kind must be one of gaussian, rademacher"),
        ({"rounding": "up"}, "rounding must be one of auto, nearest, stochastic"),
        ({"backend": "gpu"}, "backend must be one of auto, reference, cpu, triton"),
        ({"max_weight_growth": 0.5}, "max_weight_growth must be 0"),
        ({"seed": -1}, "seed must be an integer in [0, 2**64)"),
        ({"direction_cache_gb": -0.1}, "direction_cache_gb must be a finite number >= 0"),
        ({"direction_cache_gb": 1, "direction_kind": "rademacher"}, "Rademacher signs cost less to generate"),
        ({"direction_cache_gb": 1, "backend": "triton"}, "direction_cache_gb: the direction cache serves Gaussian"),
    ],
)
def test_make_checks_its_arguments(kw, needle):
    args = {"num_examples": 512, "steps": 3, "batch_size": 64, **kw}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        dpzo_engine.PrivateZO.make(nn.Linear(8, 2), **args)


class TokenModel(nn.Module):
    """The smallest model that takes token ids, as a language model does."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(16, 4), nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(input_ids).mean(1))


@pytest.mark.parametrize("method", ["dp-aggzo", "dpzero", "dp-aggzo-perdir", "dp-zoso", "dp-zopo", "mezo"])
def test_an_option_left_unset_means_what_it_means_on_the_command_line(method):
    """``PrivateZO.make(method=m)`` with nothing else set runs the method the CLI's ``--method m`` runs:
    the same K, η, λ, C, clipping and stage schedule (the API once ran K = 16 where the CLI ran 64,
    DP-ZOSO/DP-ZOPO without stages or mask, and the per-direction ablation with joint clipping)."""
    from dpzo_engine.run.config import TrainConfig, validate

    steps = 30
    cli = validate(TrainConfig(method=method, steps=steps)).zo_options()

    def run(**options) -> dpzo_engine.PrivateZO:
        model = TokenModel()  # DP-ZOPO's data-free mask scores a model on token ids
        return dpzo_engine.PrivateZO.make(
            model, num_examples=512, steps=steps, batch_size=64, epsilon=2.0, method=method, **options
        )

    api = run()
    as_cli = run(**{f.name: getattr(cli, f.name) for f in dataclasses.fields(cli) if f.name != "method"})
    assert api.header() == as_cli.header()
    assert api.options.num_directions == cli.num_directions and api.options.lr == cli.lr


def test_dp_zopo_on_a_model_without_token_inputs_is_refused_up_front():
    """DP-ZOPO's data-free mask scores the model on one token (``model(input_ids=...)``): a model that
    takes no token ids gets one line when the run is made, not a TypeError from inside torch at step 1."""
    with pytest.raises(ConfigError, match="dp-zopo's data-free mask needs a model that takes input_ids"):
        make(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), method="dp-zopo", noise_seed=None)


def test_dpzero_takes_one_direction_in_the_api_too():
    with pytest.raises(ConfigError, match="dpzero uses one direction per step"):
        make(nn.Linear(8, 2), method="dpzero", num_directions=4, noise_seed=None)


def test_make_puts_the_model_in_eval_mode_and_rounds_bf16_stochastically():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    zo = make(model)
    assert not model.training and zo.options.rounding == "nearest"
    half = make(nn.Linear(8, 2).to(torch.bfloat16))
    assert half.options.rounding == "stochastic"


def test_state_round_trip_continues_exactly():
    """Model parameters + state_dict + secret_state: a fresh object continues as if never stopped."""
    x, y = blobs()
    torch.manual_seed(0)
    whole = nn.Linear(8, 2)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    zo = make(whole, steps=10)
    for idx in zo.batches():
        zo.step(ce(whole), x[idx], y[idx])

    first = nn.Linear(8, 2)
    first.load_state_dict(start)
    zo1 = make(first, steps=10)
    for _ in range(4):
        idx = zo1.sample()
        zo1.step(ce(first), x[idx], y[idx])
    saved = ({k: v.clone() for k, v in first.state_dict().items()}, zo1.state_dict(), zo1.secret_state())

    second = nn.Linear(8, 2)
    second.load_state_dict(saved[0])
    zo2 = make(second, steps=10, noise_seed=99)  # the secret state replaces this generator's
    zo2.load_state_dict(saved[1])
    zo2.load_secret_state(saved[2])
    for idx in zo2.batches():
        zo2.step(ce(second), x[idx], y[idx])
    assert zo2.steps_done == 10 and zo2.plan.accountant.epsilon() == zo.plan.accountant.epsilon()
    assert zo2.epsilon() is None and zo2.plan.status() == zo.plan.status()  # a debug key stays "not private"
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), second.parameters()))


@pytest.mark.parametrize(
    ("changed", "needle"),
    [({"num_directions": 8}, "num_directions"), ({"lr": 0.1}, "lr"), ({"method": "dp-zoso"}, "method")],
)
def test_a_state_from_another_configuration_is_refused(changed, needle):
    """The API's counterpart of resuming a run directory with another config: one line naming the option,
    not a run that silently continues with other K, η or method (the backend may change: same bits)."""
    x, y = blobs()
    model = nn.Linear(8, 2)
    zo = make(model, steps=10)
    idx = zo.sample()
    zo.step(ce(model), x[idx], y[idx])
    state = zo.state_dict()
    with pytest.raises(ConfigError, match=f"this state was saved with {needle}="):
        make(nn.Linear(8, 2), steps=10, **changed).load_state_dict(state)
    make(nn.Linear(8, 2), steps=10, backend="cpu").load_state_dict(state)  # another backend: the same bits
    legacy = {k: v for k, v in state.items() if k != "options"}  # saved before states held their options
    make(nn.Linear(8, 2), steps=10).load_state_dict(legacy)


def test_the_trainer_steps_through_the_api():
    """The CLI is a user of PrivateZO, not a second implementation."""
    from dpzo_engine.run.session import Session

    assert Session._build_engine.__qualname__ == "Session._build_engine"
    src = (ROOT / "dpzo_engine" / "train.py").read_text()
    assert "zo.sample()" in src and "zo.step(" in src


# ----------------------------------------------------------------------------- the examples, as a user runs them


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def figures(out: str) -> tuple[float, float, float]:
    before = float(re.search(r"test accuracy before: ([\d.]+)", out).group(1))
    after = float(re.search(r"test accuracy after: ([\d.]+)", out).group(1))
    eps = float(re.search(r"epsilon spent: ([\d.]+)", out).group(1))
    return before, after, eps


def test_example_own_model():
    before, after, eps = figures(run_example("own_model.py", "--steps", "100"))
    assert after > before + 0.2 and eps <= 2.0  # a learnable rule: 0.52 -> 0.93 in the run this was written on


def test_example_hf_classifier(tmp_path):
    out = run_example(
        "hf_classifier.py",
        "--steps",
        "3",
        "--directions",
        "4",
        "--per-class",
        "32",
        "--batch-size",
        "16",
        "--test-size",
        "32",
        "--out",
        str(tmp_path / "m"),
    )
    _, _, eps = figures(out)
    assert eps <= 2.0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")  # plain transformers loads it
    assert model.config.num_labels == 2
