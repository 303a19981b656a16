"""Test set-up: CPU by default; Triton kernels run under TRITON_INTERPRET=1 without CUDA.

The interpreter flag is read when a ``triton.jit`` function is created, so it is set
here, before any test module imports ``dpzo_triton``.
"""

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from threads, and on a busy 2-core machine
    OpenMP barriers turn each 10 µs op into milliseconds. Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def refused(capsys):
    """``refused(argv, needle)``: the trainer exits 2 with one ``error:`` line that names ``needle``, and
    nothing else on stderr: the project's rule for bad input (no traceback, no usage dump)."""
    from dpzo_engine.train import main

    def check(argv: list[str], needle: str) -> None:
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], (code, err)

    return check


POSITIVE = ["good", "great", "lovely", "happy", "excellent", "fun", "nice", "best"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "boring", "worst", "ugly", "poor"]


def write_split(path: Path, n: int, seed: int) -> None:
    """A learnable CSV split: sentiment words decide the label, a random token keeps rows distinct."""
    rng = random.Random(seed)
    rows = ["text,label"]
    for i in range(n):
        label = i % 2
        words = [*rng.sample(POSITIVE if label else NEGATIVE, 3), f"w{rng.randint(0, 999)}"]
        rows.append(f"{' '.join(words)} {i},{'positive' if label else 'negative'}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, data dir) for end-to-end CLI runs: a tiny random BERT (128 positions) saved with MiniLM's real
    tokenizer, and train / dev / test CSV splits of 96 / 16 / 32 examples (``--task local``)."""
    from transformers import AutoTokenizer

    from dpzo_engine.models.loading import build_random_model, minilm_dir

    root = tmp_path_factory.mktemp("assets")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    # 128 positions: room for the local task's default --max-length
    model = build_random_model(
        "bert", "tiny", num_labels=2, seed=0, vocab_size=tokenizer.vocab_size, max_position_embeddings=128
    )
    model.save_pretrained(root / "tiny-bert")
    tokenizer.save_pretrained(root / "tiny-bert")
    data = root / "data"
    data.mkdir()
    for split, n, seed in (("train", 96, 0), ("dev", 16, 1), ("test", 32, 2)):
        write_split(data / f"{split}.csv", n, seed)
    return root / "tiny-bert", data
