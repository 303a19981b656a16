"""``python -m dpzo_engine.train``: differentially private zeroth-order fine-tuning.

With no arguments it runs the embedded default (MiniLM-L6 on real tweet sentiment,
DP-AggZO at ε = 2, δ = 1e-5).  The loop below is the whole algorithm of
docs/design.md section 5, driven through the Python API (``PrivateZO``: sample, step, ε); set-up
lives in ``run/session.py``, privacy in ``privacy/``, the step in ``zo/``, kernels in ``ops``.
"""

from __future__ import annotations

import shlex
import sys
import time

from tqdm import tqdm

from .core.errors import UserError, report
from .run.config import FIRST_ORDER_METHODS, TrainConfig, parse_args
from .run.run_dir import RunDir
from .run.session import Session


def train(cfg: TrainConfig, run: RunDir, s: Session) -> dict:
    bar = tqdm(range(s.start_step, cfg.steps), initial=s.start_step, total=cfg.steps, desc="train", unit="step")
    zo = s.zo
    t0 = time.time()
    for step in bar:
        idx = zo.sample()  # Poisson batch from the secret generator
        rec = zo.step(s.loss_fn(idx), forwards=s.forwards())  # estimate, clip + noise, fused update
        eps = zo.epsilon()
        s.log_release(run, rec, eps)  # the ledger: (stage row,) seeds, released vector, ε
        s.loss_meter.update(rec.loss, rec.released)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            s.log_progress(run, bar, done, eps, time.time() - t0)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            run.log_metrics({"step": done, "split": "dev", **s.evaluate("dev")})
        if done % cfg.save_every == 0 and done < cfg.steps:
            s.save_checkpoint(run, done)
    bar.close()
    return s.finalize(run, time.time() - t0)


def method_entry(cfg: TrainConfig):
    """(session class, training loop) of ``cfg.method``: this ZO loop, or DP-AdamW / AdamW (first_order)."""
    if cfg.method in FIRST_ORDER_METHODS:
        from .run import first_order  # imports Opacus: only when asked for

        return first_order.FirstOrderSession, first_order.train
    return Session, train


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run = RunDir(cfg.output_dir)
        resuming = run.check_start(cfg)
        session_cls, loop = method_entry(cfg)
        session = session_cls(cfg, run, resuming)
    except UserError as exc:
        return report(exc)
    try:
        summary = loop(cfg, run, session)
    except UserError as exc:
        return report(exc)
    except KeyboardInterrupt:
        hint = (
            f"first-order runs cannot be resumed; start again with an --output-dir other than {run.path}"
            if cfg.method in FIRST_ORDER_METHODS
            else f"resume with: python -m dpzo_engine.train --resume --output-dir {shlex.quote(str(run.path))}"
        )
        print(f"\ninterrupted; {hint}", file=sys.stderr)
        return 130
    session.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
