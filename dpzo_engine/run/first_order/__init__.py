"""First-order baselines: DP-AdamW (Opacus per-example clipping) and non-private AdamW.

Why they live in this engine: the case for DP zeroth-order training is that DP first-order
fine-tuning needs far more memory for the same utility. Both baselines therefore run from the
same trainer (``--method dp-adamw | adamw``), on the same tasks, heads, Poisson sampler and
privacy module as the ZO methods, so a comparison differs only in the optimiser.

DP-AdamW step (Abadi et al. 2016 with AdamW; docs/design.md section 6 rules)::

    batch = PoissonSampler(n, q, secret).sample()     # our sampler; may be empty
    g_x   = grad of the per-example loss ℓ(θ; x)       # Opacus: norms, or per-sample gradients
    S     = Σ_x g_x · min(1, C / ||g_x||)              # per-example L2 clip of the whole gradient
    g̃     = (S + N(0, σ²C² I_d)) / (q·ñ)               # noise from a secret generator on θ's device
    θ     ← AdamW(θ, g̃)                                # σ from calibrate_noise, ε from PrivacyAccountant

Opacus does the per-example part only; sampling, σ and accounting are ours. Its modes:

* ``ghost`` (``GradSampleHooksFastGradientClipping``, ghost clipping): per-example gradient norms
  from activations and output gradients without materialising per-sample gradients (Linear,
  Embedding; LayerNorm by small per-sample gradients), then a second backward of Σ_x c_x ℓ_x.
  Memory close to non-private training. Not possible with parameters tied across modules
  (Opacus raises), e.g. a causal LM whose ``lm_head`` is its input embedding.
* ``fast`` (the same hooks, ``use_ghost_clipping=False``): per-sample gradients one layer at a
  time, reduced to norms and freed; handles tied parameters (their per-sample gradients from
  both uses are summed before the norm). Costs one layer's B × |θ_layer| at a time.
* ``hooks`` (``GradSampleHooks`` + ``DPOptimizer``, Opacus' classic mode): every layer's
  per-sample gradients at once (B × |θ|); use ``physical_batch_size`` to bound it.

``auto`` takes ``ghost`` unless trainable parameters are tied, then ``fast``. Opacus only sees
module calls with per-example rows: ``OpacusCompat`` rewrites the Hugging Face call patterns
that break this (exactly), and ``ParameterUseAudit`` refuses a run whose head uses a trainable
parameter outside its module (its per-example gradient would escape clipping). Empty Poisson
batches release noise only. Clipping in bf16/fp16 is done at C·(1 − 2⁻⁶), a margin for a few
roundings of the half-precision norms (2⁻⁸ relative each) before they could push an example's
contribution above C; the noise std stays σ·C. Half-precision parameters train with fp32 master weights and moments
(``MasterWeightAdamW``): a bf16 AdamW would drop every update below half an ulp. Models train
in ``train()`` mode (dropout as configured), as first-order fine-tuning does.

Randomness: Poisson sampling is the plan's (exact, from the run's SHAKE-256 key). The d-dimensional
noise is Opacus' with ``secure_mode`` (a sum of four Gaussians, Holohan & Braghin 2021), drawn from
a torch generator on the parameters' device seeded with 64 bits from the key. That generator is not
a cryptographic one (millions of values per step rule out the exact sampler of the ZO path), and the
sum of Gaussians is a mitigation, not an exact sampler: a weaker floating-point story than the ZO
methods', stated in privacy.json. Resume and replay are ZO features.
"""

from .loop import FirstOrderSession, train
from .opacus_compat import OpacusCompat, OpacusModeError, ParameterUseAudit, choose_opacus_mode, tied_parameters
from .trainer import (
    HALF_PRECISION,
    HALF_PRECISION_CLIP_MARGIN,
    FirstOrderTrainer,
    MasterWeightAdamW,
    StepStats,
    TrainingDiverged,
    build_optimizer,
    split_batch,
)

__all__ = [
    "HALF_PRECISION",
    "HALF_PRECISION_CLIP_MARGIN",
    "FirstOrderSession",
    "FirstOrderTrainer",
    "MasterWeightAdamW",
    "OpacusCompat",
    "OpacusModeError",
    "ParameterUseAudit",
    "StepStats",
    "TrainingDiverged",
    "build_optimizer",
    "choose_opacus_mode",
    "split_batch",
    "tied_parameters",
    "train",
]
