"""``python -m dpzo_engine.train``: differentially private zeroth-order fine-tuning.

With no arguments it runs the embedded default (MiniLM-L6 on real tweet sentiment,
DP-AggZO at ε = 2, δ = 1e-5).  The loop below is the whole algorithm of DESIGN
section 5; set-up lives in ``session.py``, privacy in ``privacy/``, kernels in ``ops``.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from . import stream
from .config import FIRST_ORDER_METHODS, TrainConfig, parse_args
from .errors import UserError, report
from .prefix_cache import cached_prefix
from .run_dir import RunDir
from .session import Session


def train(cfg: TrainConfig, run: RunDir, s: Session) -> dict:
    K, rounding = cfg.num_directions, cfg.update_rounding()
    bar = tqdm(range(s.start_step, cfg.steps), initial=s.start_step, total=cfg.steps, desc="train", unit="step")
    t0 = time.time()
    for step in bar:
        lr, zo_eps = s.stages.at(step)  # constant, or DP-ZOSO's stage schedule
        if s.stages.boundary(step):  # DP-ZOSO/ZOPO: data-free mask and proximal anchor (public, no ε)
            run.log_ledger(s.stages.enter_stage(step))
        idx = s.sampler.sample()  # Poisson, from the secret generator
        batch = s.batch(idx)
        loss_fn = (lambda b=batch: s.head.per_example_loss(s.model, b)) if batch is not None else None
        seeds = stream.step_seeds(cfg.seed, step, K)  # public
        with torch.no_grad(), cached_prefix(s.model, s.cached_blocks):  # frozen bottom blocks run once
            D = s.engine.estimate(loss_fn, seeds, zo_eps)
            released = s.rule(D)  # clip, noise, / (q n) for private methods
            coefs = (-lr * released.grad).to(torch.float32).tolist()
            s.engine.finish(seeds, zo_eps, coefs, rounding, stream.rounding_seed(cfg.seed, step))
            s.stages.after_update(step, lr)  # proximal pull towards the stage's start (--prox)
        s.accountant.step()
        eps = s.accountant.epsilon() if cfg.private else None
        run.log_ledger(
            {
                "type": "step",
                "step": step + 1,
                "seeds": seeds,
                "rounding_seed": stream.rounding_seed(cfg.seed, step),
                "zo_eps": zo_eps,
                "lr": lr,
                "released": released.grad.tolist(),
                "coefs": coefs,
                "epsilon": eps,
            }
        )
        s.loss_meter.update(s.engine.last_loss, released)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = s.loss_meter.flush(done, eps, s.engine.counter, time.time() - t0)
            run.log_metrics(row)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                eps=f"{eps:.3f}" if eps is not None else "-",
                clipped=f"{row['fraction_clipped']:.2f}",
            )
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            run.log_metrics({"step": done, "split": "dev", **s.evaluate("dev")})
        if done % cfg.save_every == 0 and done < cfg.steps:
            s.save_checkpoint(run, done)
    bar.close()
    return s.finalize(run, time.time() - t0)


def method_entry(cfg: TrainConfig):
    """(session class, training loop) of ``cfg.method``: this ZO loop, or DP-AdamW / AdamW (first_order)."""
    if cfg.method in FIRST_ORDER_METHODS:
        from . import first_order  # imports Opacus: only when asked for

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
            else f"resume with: python -m dpzo_engine.train --resume --output-dir {run.path}"
        )
        print(f"\ninterrupted; {hint}", file=sys.stderr)
        return 130
    session.print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
