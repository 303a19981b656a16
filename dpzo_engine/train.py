"""``python -m dpzo_engine.train``: differentially private zeroth-order fine-tuning.

With no arguments it runs the embedded default (MiniLM-L6 on real tweet sentiment,
DP-AggZO at ε = 2, δ = 1e-5).  The loop below is the whole algorithm of
docs/design.md section 5, driven through the Python API (``PrivateZO``: sample, step, ε); set-up
lives in ``run/session.py``, privacy in ``privacy/``, the step in ``zo/``, kernels in ``ops``.
Under ``torchrun`` every rank runs this same loop (``run/distributed.py``, docs/distributed.md):
rank 0 samples, releases and writes; the others forward their share and check their replica.
"""

from __future__ import annotations

import errno
import shlex
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch and transformers import (seconds): one line, no traceback
    from .core.interrupts import quiet_until_main

    quiet_until_main()

import time
from collections.abc import Callable

from tqdm import tqdm

from .core.errors import UserError
from .core.interrupts import Interrupted, Interrupts, exit_code
from .run import distributed
from .run.config import FIRST_ORDER_METHODS, TrainConfig, parse_args
from .run.run_dir import RunDir
from .run.session import Session
from .zo.parallel import Comm


def train(cfg: TrainConfig, run: RunDir, s: Session, signals: Interrupts | None = None) -> dict:
    bar = tqdm(range(s.start_step, cfg.steps), initial=s.start_step, total=cfg.steps, desc="train", unit="step",
               disable=not s.comm.is_root)  # fmt: skip
    zo, stop = s.zo, signals or Interrupts()
    t0 = time.time()
    with stop.deferred():  # Ctrl-C / SIGTERM: finish this step, checkpoint, exit (core/interrupts.py)
        for step in bar:
            idx = zo.sample()  # Poisson batch from the secret generator (rank 0); this rank's share of it
            rec = zo.step(s.loss_fn(idx), forwards=s.forwards())  # estimate, clip + noise, update; guarded
            eps = zo.epsilon()
            s.log_release(run, rec, eps)  # the ledger: (stage row,) seeds, released vector, ε
            s.loss_meter.update(rec.loss, rec.released, rec.loss_count)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                s.comm.check_replicas(done, s.flat.buffers)  # every rank's θ must still equal rank 0's
                s.log_progress(run, bar, done, eps, time.time() - t0)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                run.log_metrics({"step": done, "split": "dev", **s.evaluate("dev")})
            signum = s.comm.stop_signal(stop.signum if stop.requested else None)  # on any rank: on all
            if (done % cfg.save_every == 0 and done < cfg.steps) or signum:
                s.save_checkpoint(run, done)
            if signum:
                raise Interrupted(signum, done)
    bar.close()
    return s.finalize(run, time.time() - t0)


def method_entry(cfg: TrainConfig):
    """(session class, training loop) of ``cfg.method``: this ZO loop, or DP-AdamW / AdamW (first_order)."""
    if cfg.method in FIRST_ORDER_METHODS:
        from .run import first_order  # imports Opacus: only when asked for

        return first_order.FirstOrderSession, first_order.train
    return Session, train


def output_dir(cfg: TrainConfig, comm: Comm) -> RunDir | distributed.ReplicaRun:
    """Rank 0's ``RunDir`` (it alone reads and writes the directory); a ``ReplicaRun`` elsewhere."""
    return RunDir(cfg.output_dir) if comm.is_root else distributed.ReplicaRun(cfg.output_dir)


def open_run(cfg: TrainConfig, comm: Comm, run: RunDir | distributed.ReplicaRun) -> tuple[Session, Callable]:
    """The run's lock and checks (rank 0), the session and its loop, with set-up errors agreed between
    the ranks (one line from rank 0, exit 2 everywhere)."""

    def claim() -> bool | None:  # rank 0 alone takes the lock: one writer per directory, whatever the ranks
        if not comm.is_root:
            return None
        run.check_output_dir(cfg.resume)  # before anything loads or is written
        run.acquire()
        return run.check_start(cfg)  # a resume verifies every file first

    resuming = distributed.from_root(comm, distributed.agree(comm, claim))
    session_cls, loop = method_entry(cfg)
    session = distributed.agree(comm, lambda: session_cls(cfg, run, resuming, comm))
    session.open(run, resuming)
    return session, loop


def main(argv: list[str] | None = None, prog: str = "python -m dpzo_engine.train") -> int:
    signals = Interrupts()
    with signals.installed():
        comm = run = cfg = None
        together = False  # every rank leaves at the same point (run/distributed.py: finish)
        try:
            cfg = parse_args(argv, prog)
            comm = distributed.start(cfg)  # torchrun's ranks, or one rank
            if cfg.steps == 0:  # evaluation only: no run directory, no privacy spent (one rank)
                from .evaluate import evaluate_only, print_metrics

                print_metrics(evaluate_only(cfg))
                return 0
            run = output_dir(cfg, comm)
            session, loop = open_run(cfg, comm, run)
            summary = loop(cfg, run, session, signals)
            together = True
        except UserError as exc:
            together = distributed.ends_together(exc)
            return distributed.report_error(exc, comm)  # rank 0 speaks for errors every rank met alike
        except OSError as exc:  # a full disk, a directory made read-only under us: the cause and the file
            return distributed.report_error(_disk_error(exc, run), comm)
        except KeyboardInterrupt as exc:
            together = distributed.ends_together(exc)
            signum = exc.signum if isinstance(exc, Interrupted) else signals.signum  # the job's, when agreed
            if comm is None or comm.is_root:
                print(f"\n{_interrupted(exc, signum, cfg, run)}", file=sys.stderr)
            return exit_code(signum)
        finally:
            if run is not None:
                run.abandon()  # set-up failed before anything was committed: leave nothing behind
                run.release()
            distributed.finish(comm, together)
    if comm.is_root:
        session.print_summary(summary)
    return 0


def console() -> int:
    """The ``dpzo-train`` command (its --help and errors name it)."""
    return main(prog="dpzo-train")


def _interrupted(exc: KeyboardInterrupt, signum: int | None, cfg: TrainConfig | None, run: RunDir | None) -> str:
    """The one line a signal ends with: what was kept and how to go on."""
    name = "Ctrl-C" if signum in (None, signal.SIGINT) else signal.Signals(signum).name
    if cfg is None or not isinstance(run, RunDir) or not run.committed:
        return f"interrupted ({name}) during set-up; nothing was written"
    if cfg.method in FIRST_ORDER_METHODS:
        return f"interrupted ({name}); first-order runs cannot be resumed: start again in another --output-dir"
    kept = f"checkpoint saved at step {exc.step}; " if isinstance(exc, Interrupted) else ""
    command = f"python -m dpzo_engine.train --resume --output-dir {shlex.quote(str(run.path))}"
    return f"interrupted ({name}); {kept}resume with: {command}"


def _disk_error(exc: OSError, run: RunDir | None) -> UserError:
    """One line for an OSError the run met (a full disk, permissions changed under it): the file and the cause."""
    where = exc.filename or (run.path if run else "the output directory")
    hint = ""
    if run is not None and run.committed:
        fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        hint = f"; {fix}, then --resume --output-dir {shlex.quote(str(run.path))}"
    return UserError(f"{where}: {exc.strerror or exc}{hint}")


if __name__ == "__main__":
    sys.exit(main())
