"""The secret randomness of a run: a cryptographic generator whose draws are addressed, not consumed.

Why addressed: a resume must never redraw what was released, and must continue past every draw
already made, after a kill at any moment. So no generator *state* moves through the run. The
run holds one secret 256-bit key (OS entropy), and every draw is a pure function of the key and
its address: ``stream("poisson", r)`` and ``stream("gauss", r)`` for release ``r``,
``stream("count")`` for the noisy dataset size. A resume that knows how many releases the
ledger holds knows exactly where to continue; a step redone after a kill mid-step (nothing of
it released) draws the same batch and noise again, which publishes nothing new.

The generator is SHAKE-256 (FIPS 202) over ``key ‖ address``, read as an unbounded stream: a
keyed sponge, i.e. a pseudorandom function of the address, so streams of different addresses
are independent and no output reveals the key. Nothing public is derived from the key except
through the DP mechanisms. A debug seed (``--noise-seed``) replaces the key by a hash of the
seed: reproducible by anyone who knows the seed, so NOT private (a ``NotPrivateWarning`` says so).

The key is stored in one file, created with mode 600 (``save``): there is never a moment when
another local user could open it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError

KEY_BYTES = 32
KEY_FILE_MAGIC = "dpzo-engine secret key v1"
_DEBUG_DOMAIN = b"dpzo-engine/debug-noise-seed/v1"


class PrivacyError(UserError, ValueError):
    """Invalid privacy parameters; the message is one line, the trainer prints it as is."""


class NotPrivateWarning(UserWarning):
    """The run's sampling and noise are reproducible: its outputs are NOT differentially private."""


class SecretStream:
    """The bytes of SHAKE-256(key ‖ address), read in order.

    SHAKE's output is prefix-consistent (the first m bytes of a longer output are the m-byte
    output), so the stream is extended by recomputing a longer digest, doubling each time.
    """

    def __init__(self, material: bytes):
        self._xof = hashlib.shake_256(material)
        self._buf = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._buf):
            self._buf = self._xof.digest(max(end, 2 * len(self._buf), 64))
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    def uint64(self, n: int) -> np.ndarray:
        """``n`` independent uniform 64-bit integers."""
        return np.frombuffer(self.read(8 * n), dtype="<u8")

    def u32(self) -> int:
        return int.from_bytes(self.read(4), "little")

    def bit(self) -> int:
        return self.read(1)[0] & 1

    def below(self, m: int) -> int:
        """A uniform integer in [0, m), exactly (rejection of the draws >= m; m may be huge)."""
        if m < 1:
            raise ValueError(f"below() needs m >= 1, got {m}")
        bits = (m - 1).bit_length()
        nbytes = (bits + 7) // 8
        mask = (1 << bits) - 1
        while True:
            v = int.from_bytes(self.read(nbytes), "little") & mask if bits else 0
            if v < m:
                return v


class SecretGenerator:
    """One run's secret key and the streams addressed by it (see the module docstring).

    ``from_os_entropy()`` for private runs; ``from_debug_seed(s)`` for reproducible debugging
    (warns: NOT private). Not picklable, so it cannot end up in a checkpoint by accident: store
    it with ``save`` (mode 600) or ``key`` yourself.
    """

    def __init__(self, key: bytes, *, debug_seed: int | None = None, reproducible: bool = False):
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise PrivacyError(f"a secret key is {KEY_BYTES} bytes")
        self._key = key
        self.debug_seed = debug_seed
        self._reproducible = reproducible or debug_seed is not None

    @classmethod
    def from_os_entropy(cls) -> SecretGenerator:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_debug_seed(cls, seed: int, what: str = "Poisson sampling and DP noise are") -> SecretGenerator:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PrivacyError(f"debug seed must be an int, got {seed!r}")
        warnings.warn(
            f"DEBUG noise seed {seed} set: {what} reproducible by anyone who knows it, "
            "so this run is NOT differentially private",
            NotPrivateWarning,
            stacklevel=3,
        )
        key = hashlib.sha256(_DEBUG_DOMAIN + str(seed).encode()).digest()
        return cls(key, debug_seed=seed)

    @classmethod
    def from_torch(cls, generator: torch.Generator) -> SecretGenerator:
        """A key drawn from a torch generator: reproducible from its seed, so NOT private (warned).
        Keeps code that passes a ``torch.Generator`` working, with the secure samplers."""
        seed = torch.randint(0, 2**62, (4,), generator=generator, device=generator.device).tolist()
        warnings.warn(
            "a torch.Generator was given as the secret generator: its draws are reproducible from its seed, "
            "so the noise is NOT private; use privacy.secret_generator()",
            NotPrivateWarning,
            stacklevel=3,
        )
        return cls(hashlib.sha256(b"dpzo-engine/torch/v1" + repr(seed).encode()).digest(), reproducible=True)

    @property
    def reproducible(self) -> bool:
        """True for a debug seed: anyone who knows it can recompute the noise (the run is NOT private)."""
        return self._reproducible

    @property
    def key(self) -> bytes:
        """SECRET. Whoever holds it can recompute every noise draw of the run."""
        return self._key

    def stream(self, purpose: str, position: int = 0) -> SecretStream:
        """The stream at address (purpose, position): independent of every other address."""
        label = purpose.encode()
        if not 0 < len(label) < 256 or not isinstance(position, int) or position < 0:
            raise PrivacyError(f"bad stream address ({purpose!r}, {position!r})")
        return SecretStream(self._key + bytes([len(label)]) + label + position.to_bytes(8, "little"))

    def torch_seed(self, purpose: str) -> int:
        """A 64-bit seed for a torch generator (d-dimensional noise drawn on a device by Opacus)."""
        return int.from_bytes(self.stream("torch-seed/" + purpose).read(8), "little")

    # ------------------------------------------------------------------ the key file
    def save(self, path: str | Path) -> None:
        """Write the key to ``path``, created with mode 600 (never readable by others, not even briefly).

        A temporary file is opened with O_CREAT | O_EXCL | O_NOFOLLOW and mode 0o600, written, synced
        and renamed over ``path``: a crash leaves the old file or the new one, never a partial key."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)  # a leftover of an interrupted save (ours: same directory)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, f"{KEY_FILE_MAGIC}\n{self._key.hex()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> SecretGenerator:
        path = Path(path)
        try:
            magic, hexkey = path.read_text().splitlines()
            key = bytes.fromhex(hexkey)
        except (OSError, ValueError, UnicodeDecodeError):
            raise PrivacyError(f"{path} is not a secret key file written by this engine") from None
        if magic != KEY_FILE_MAGIC or len(key) != KEY_BYTES:
            raise PrivacyError(f"{path} is not a secret key file written by this engine")
        return cls(key)

    def __reduce__(self):
        raise TypeError("a SecretGenerator is not picklable: store its key apart (SecretGenerator.save, mode 600)")

    def __repr__(self) -> str:
        kind = "OS entropy" if not self.reproducible else f"debug seed {self.debug_seed}: NOT private"
        return f"SecretGenerator({kind})"


def as_secret_generator(generator) -> SecretGenerator:
    """``generator`` as a ``SecretGenerator``; a ``torch.Generator`` becomes a reproducible (warned) one."""
    if isinstance(generator, SecretGenerator):
        return generator
    if isinstance(generator, torch.Generator):
        return SecretGenerator.from_torch(generator)
    raise PrivacyError("the secret generator must be a privacy.SecretGenerator (see privacy.secret_generator())")
