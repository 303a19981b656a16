"""DP-ZOPO's data-free masks: exact sign restore, exact selection, the score, masked ZO, strategies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dpzo_engine import ops
from dpzo_engine.core import stream
from dpzo_engine.core.errors import ConfigError
from dpzo_engine.core.flat import FlatParams
from dpzo_engine.heads import SequenceClassificationHead
from dpzo_engine.models.loading import build_random_model, random_batch, select_trainable
from dpzo_engine.models.prefix_cache import cached_prefix, frozen_prefix_length
from dpzo_engine.zo.engine import ZOEngine
from dpzo_engine.zo.pruning import (
    SENTINEL,
    Classifier,
    MaskPolicy,
    build_mask,
    estimate_hessian_gradient,
    linearized,
    mask_extra_bytes,
    pack_bits,
    probe_seed,
    rank_multipliers,
    score_chunks,
    score_keys,
    select_boundaries,
    unpack_bits,
)
from dpzo_engine.zo.rules import MeZORule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()]).clone()


def kept(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ops.unpack_mask(packed, n)


def tiny(arch: str = "bert", dtype=torch.float32) -> nn.Module:
    return build_random_model(arch, "tiny", seed=0, dtype=dtype)


# ----------------------------------------------------------------------------- bits
def test_fast_bit_packing_is_the_kernels_mask_format():
    g = torch.Generator().manual_seed(0)
    for n in (1, 8, 13, 4099):
        keep = torch.rand(n, generator=g) < 0.3
        packed = pack_bits(keep)
        assert torch.equal(packed, ops.pack_mask(keep))
        assert torch.equal(unpack_bits(packed, 0, n), keep)
        if n > 16:
            assert torch.equal(unpack_bits(packed, 8, n - 8), keep[8:])
    with pytest.raises(ValueError, match="multiple of 8"):
        unpack_bits(packed, 3, 5)


# ----------------------------------------------------------------------------- signs
def test_linearized_restores_every_bit_including_zeros_and_nans():
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny(dtype=dtype)
        p = next(model.parameters())
        p.data.view(-1)[:4] = torch.tensor([-0.0, 0.0, float("nan"), -float("inf")], dtype=dtype)
        p.data.view(-1)[4:6] = -p.data.view(-1)[4:6].abs()
        before = [bits(q) for q in model.parameters()]
        with linearized(model, chunk=64):  # several chunks per tensor
            assert not any(torch.signbit(q).any() for q in model.parameters())
            next(model.parameters()).data.view(-1)[7] = -1.0  # rounding residue of a probe: sign set
        after = [bits(q) for q in model.parameters()]
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if not torch.equal(a, b)]
        assert changed == [0]  # only the element we overwrote, and only in magnitude: its sign came back
        sign_bit = -(1 << (p.element_size() * 8 - 1))
        assert ((after[0] ^ before[0]) & sign_bit).eq(0).all()


# ----------------------------------------------------------------------------- exact selection
def reference_ranks(keys: torch.Tensor) -> torch.Tensor:
    """Position of each element in the total order (key, index)."""
    order = sorted(range(keys.numel()), key=lambda i: (int(keys[i]), i))
    pos = torch.empty(keys.numel(), dtype=torch.int64)
    pos[torch.tensor(order)] = torch.arange(keys.numel())
    return pos


def test_radix_select_is_exact_with_ties_and_sentinels():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5000, generator=g) * 1e-3
    scores[::7] = 2.5e-4  # a big tie block across chunks
    scores[3::11] = 0.0
    scores[5] = float("nan")
    for largest in (False, True):
        keys = score_keys(scores, largest)
        keys[100:140] = SENTINEL  # excluded (e.g. already kept)
        chunks = [keys[i : i + 512] for i in range(0, keys.numel(), 512)]
        ranks = [0, 1, 357, 714, 2500, 4958]  # 4958 = every selectable element (5000 - 41 excluded - 1 NaN)
        cuts = select_boundaries(lambda chunks=chunks: iter(chunks), ranks)
        classify = Classifier(cuts)
        cls = torch.cat([classify(c) for c in chunks])
        pos = reference_ranks(keys)
        expected = sum((pos >= r).long() for r in ranks)
        assert torch.equal(cls, expected)
        if not largest:
            assert int((cls == 0).sum()) == 0 and int((cls <= 1).sum()) == 1
            first = torch.nonzero(cls <= 1).item()
            assert keys[first] == keys[keys != SENTINEL].min()


def test_score_keys_order():
    s = torch.tensor([0.5, -2.0, 1e-8, 0.0, float("inf"), float("nan")])
    small = score_keys(s).tolist()
    assert sorted(range(6), key=lambda i: small[i])[:5] == [3, 2, 0, 1, 4] and small[5] == SENTINEL
    large = score_keys(s, largest=True).tolist()
    assert sorted(range(6), key=lambda i: large[i])[:5] == [4, 1, 0, 2, 3] and large[5] == SENTINEL


# ----------------------------------------------------------------------------- the score
def test_chunked_scores_and_mask_match_a_materialised_reference():
    model = tiny()
    flat = FlatParams(model)
    seeds = [probe_seed(7, 0, q) for q in range(4)]
    with linearized(model):
        hg, work = estimate_hessian_gradient(model, flat, seeds, 1e-3, "gaussian", "auto")
    assert work["forwards"] == 2 * 2 * 4 + 2  # two estimates, central differences, Q = 4; the audit
    assert work["sweeps"] == 2 * 2 * 4 + 1
    assert any(w != 0 for w in hg.weights)
    (buf,) = flat.buffers
    # materialised: Hg = Σ_q fp32(w_q z_q) accumulated in order (the kernel's arithmetic), score = |θ| Hg
    full = torch.zeros(buf.numel())
    for s, w in zip(hg.seeds, hg.weights):
        full = full + torch.tensor(w, dtype=torch.float32) * ops.directions(s, 0, buf.numel())
    reference = buf.abs() * full
    chunked = torch.cat([s for _, _, s in score_chunks(flat, hg, "gaussian", "auto", chunk=4096)])
    assert torch.equal(chunked, reference)
    keep = 250
    mask = build_mask(
        flat, lambda: ((b, st, score_keys(s)) for b, st, s in score_chunks(flat, hg, "gaussian", "auto", 4096)), keep
    )
    expected = torch.zeros(buf.numel(), dtype=torch.bool)
    expected[torch.argsort(reference.abs(), stable=True)[:keep]] = True  # smallest |score| (published)
    assert torch.equal(kept(mask.packed[0], buf.numel()), expected)
    assert mask.kept == keep and mask.nbytes == (buf.numel() + 7) // 8


def test_mask_is_data_free_deterministic_and_leaves_the_weights():
    model = tiny()
    flat = FlatParams(model)
    before = flat.clone_buffers()
    rng = torch.random.get_rng_state()
    a = MaskPolicy(model, flat, master_seed=3, keep_fraction=0.05, queries=4)
    a.update(0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # no global (or secret) randomness used
    assert a.mask.kept == round(0.05 * flat.numel)
    (buf,) = flat.buffers
    assert torch.equal(bits(buf), bits(before[0]))  # every weight exactly as it was
    # same weights, same public seed: the same mask (this is what replay relies on)
    flat.load_buffers(before)
    b = MaskPolicy(model, flat, master_seed=3, keep_fraction=0.05, queries=4)
    b.update(0)
    assert b.mask.fingerprint() == a.mask.fingerprint()
    flat.load_buffers(before)
    c = MaskPolicy(model, flat, master_seed=4, keep_fraction=0.05, queries=4)
    c.update(0)
    assert c.mask.fingerprint() != a.mask.fingerprint()


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("bert", "sequence-classification"),
        ("roberta", "mlm-prompt"),
        ("opt", "causal-prompt"),
        ("llama", "sequence-classification"),
    ],
)
def test_scoring_is_exact_on_every_architecture_and_head(arch, head):
    model = build_random_model(arch, "tiny", seed=0, head=head)
    flat = FlatParams(model)
    before = [bits(p) for p in model.parameters()]
    policy = MaskPolicy(model, flat, master_seed=0, keep_fraction=0.05, queries=2)
    record = policy.update(0)
    assert record["kept"] == round(0.05 * flat.numel) and any(record["score_weights"])
    assert all(torch.equal(a, bits(p)) for a, p in zip(before, model.parameters()))


class ReadsAWeightOutsideItsModule(nn.Module):
    """An LM-head-like pattern: ``F.linear(h, self.head.weight)`` bypasses ``self.head``'s forward."""

    def __init__(self, bypass: bool):
        super().__init__()
        self.emb, self.head, self.bypass = nn.Embedding(8, 4), nn.Linear(4, 3), bypass

    def forward(self, input_ids):
        h = self.emb(input_ids)
        logits = nn.functional.linear(h, self.head.weight) if self.bypass else self.head(h)
        return SimpleNamespace(logits=logits)


def test_scoring_refuses_parameters_read_outside_their_module():
    ok = ReadsAWeightOutsideItsModule(bypass=False)
    MaskPolicy(ok, FlatParams(ok), master_seed=0, keep_fraction=0.2, queries=2).update(0)
    bad = ReadsAWeightOutsideItsModule(bypass=True)
    flat = FlatParams(bad)
    before = flat.clone_buffers()
    with pytest.raises(ConfigError, match="inside its own module"):
        MaskPolicy(bad, flat, master_seed=0, keep_fraction=0.2, queries=2).update(0)
    assert torch.equal(flat.buffers[0], before[0])  # refused before any change, signs restored
    assert all(
        p.data.data_ptr() == flat.buffers[0][slot.start :].data_ptr()
        for p, slot in zip(bad.parameters(), flat.slots.values())
    )


# ----------------------------------------------------------------------------- masked ZO
def test_public_code_indexed_write_goes_to_a_copy_and_ours_does_not():
    """DPZOPO's ``param[idx].data += ...`` writes into a temporary: the parameter never changes."""
    p = nn.Parameter(torch.zeros(16))
    idx = torch.tensor([1, 5, 9])
    p[idx].data += 1.0
    assert torch.equal(p.data, torch.zeros(16))  # the pitfall
    model = tiny()
    flat = FlatParams(model)
    (buf,) = flat.buffers
    keep = torch.zeros(buf.numel(), dtype=torch.bool)
    keep[torch.randperm(buf.numel(), generator=torch.Generator().manual_seed(0))[:200]] = True
    before = buf.clone()
    engine = ZOEngine(flat, masks=[ops.pack_mask(keep)])
    head, batch = SequenceClassificationHead(), random_batch(model, 4, 8, seed=1)
    with torch.no_grad():
        for t in range(3):
            seeds = stream.step_seeds(0, t, 2)
            D = engine.estimate(lambda: head.per_example_loss(model, batch), seeds, 1e-3)
            engine.finish(seeds, 1e-3, (-0.1 * MeZORule()(D).grad).float().tolist())
    changed = buf != before
    assert torch.equal(changed, keep)  # every selected weight moved, no other one did
    assert engine.counter.passes == 3 * 5  # the mask costs no extra pass


def test_rank_bins_split_the_mask_and_scale_the_directions():
    model = tiny()
    flat = FlatParams(model)
    policy = MaskPolicy(model, flat, master_seed=0, keep_fraction=0.1, queries=4, rank_bins=4)
    policy.update(0)
    mask = policy.mask
    (buf,) = flat.buffers
    n = buf.numel()
    union = kept(mask.packed[0], n)
    parts = [kept(p, n) for p in mask.bins[0]]
    assert torch.equal(sum(p.long() for p in parts).bool(), union) and max(sum(p.long() for p in parts)) == 1
    sizes = [int(p.sum()) for p in parts]
    assert sum(sizes) == mask.kept and max(sizes) - min(sizes) <= 1
    assert mask.multipliers == rank_multipliers(4) == pytest.approx((1.15, 1.05, 0.95, 0.85))
    assert mask.nbytes == mask_extra_bytes(flat, rank_bins=4) == 4 * ((n + 7) // 8)
    # each bin moves along multiplier * z, in one rounding
    engine = ZOEngine(flat, masks=mask.engine_masks())
    before = buf.clone()
    seed = stream.direction_seed(0, 0, 0)
    engine.apply([seed], [1e-3])
    z = ops.directions(seed, 0, n)
    for part, m in zip(parts, mask.multipliers):
        coef = torch.tensor(1e-3, dtype=torch.float32) * torch.tensor(m, dtype=torch.float32)
        assert torch.equal(buf[part], before[part] + coef * z[part])
    assert torch.equal(buf[~union], before[~union])
    assert engine.counter.passes == 4  # rank bins cost one sweep each: stated in the docs


def test_strategies_static_dynamic_incremental():
    model = tiny()
    flat = FlatParams(model)
    (buf,) = flat.buffers
    n = buf.numel()
    masks = {}
    for strategy in ("static", "dynamic", "incremental"):
        flat.load_buffers([torch.linspace(-1, 1, n)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]])
        policy = MaskPolicy(model, flat, master_seed=0, keep_fraction=0.02, strategy=strategy, queries=4)
        seen = []
        for stage in range(3):
            record = policy.update(stage)
            seen.append(kept(policy.mask.packed[0], n))
            assert record["recomputed"] == (stage == 0 or strategy != "static")
            buf.mul_(0.5 + torch.rand(n, generator=torch.Generator().manual_seed(stage)))  # training moved θ
        masks[strategy] = seen
    static, dynamic, incremental = masks["static"], masks["dynamic"], masks["incremental"]
    assert all(torch.equal(m, static[0]) for m in static)
    assert all(int(m.sum()) == round(0.02 * n) for m in dynamic) and not torch.equal(dynamic[0], dynamic[2])
    assert [int(m.sum()) for m in incremental] == [round(0.02 * (s + 1) * n) for s in range(3)]
    assert all(torch.equal(incremental[s] & incremental[s + 1], incremental[s]) for s in range(2))  # nested


def test_mask_extra_bytes_is_one_bit_per_parameter():
    assert mask_extra_bytes(8) == 1 and mask_extra_bytes(9) == 2
    assert mask_extra_bytes(6_700_000_000) == 837_500_000  # OPT-6.7B: 0.84 GB next to 13.4 GB of bf16 weights
    assert mask_extra_bytes([9, 9]) == 4  # rounded up per flat buffer
    assert mask_extra_bytes(1000, rank_bins=3) == 375


def test_masks_keep_the_frozen_prefix_cache_exact():
    model = tiny("opt")
    select_trainable(model, "head,last:1")
    flat = FlatParams(model)
    blocks = frozen_prefix_length(model)
    assert blocks > 0
    policy = MaskPolicy(model, flat, master_seed=0, keep_fraction=0.2, queries=2)
    policy.update(0)
    head, batch = SequenceClassificationHead(), random_batch(model, 3, 10, seed=2)
    seeds = stream.step_seeds(0, 0, 3)
    out = []
    for length in (0, blocks):
        engine = ZOEngine(flat, masks=policy.mask.engine_masks())
        start = flat.clone_buffers()
        with torch.no_grad(), cached_prefix(model, length):
            out.append(engine.estimate(lambda: head.per_example_loss(model, batch), seeds, 1e-3))
            engine.finish(seeds, 1e-3, [0.0] * 3)
        flat.load_buffers(start)
    assert torch.equal(out[0], out[1])
