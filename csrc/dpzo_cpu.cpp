// C++/OpenMP CPU kernels of the DP-ZO engine (DESIGN sections 2 and 4).
//
// Bit-exact with the PyTorch reference (dpzo_engine/stream.py, dpzo_engine/ops/reference.py):
//  * Philox4x32-10 as Triton's tl.randint4x: key = (seed lo32, seed hi32), counter = (q lo32, q hi32, 0, 0).
//  * Gaussian: element g is component g & 3 of Box-Muller on Philox(seed, g >> 2); every step rounded to
//    fp32, ln/cos/sin evaluated in double and rounded once (vectorised in dpzo_math.h, with a rounding guard
//    that falls back to glibc; checked on every fp32 argument the stream can produce), and sqrt in fp32 (it is
//    correctly rounded, which equals double-then-round because 53 >= 2 * 24 + 2).
//  * Rademacher: bit g & 127 of the 128 Philox bits of q = g >> 7 (w0 bit 0 first), set = +1.
//  * apply: d = 0; d = d + fp32(c_j * z_j) (separate roundings: build with -ffp-contract=off, no fast-math);
//    x = fp32(buf) + d; round once to the buffer dtype (nearest-even, or stochastic for bf16).
//
// Work is split into blocks of BLOCK stream indices aligned to multiples of BLOCK, so a quad (4 normals) or
// a Rademacher group (128 signs) never straddles two blocks and every element is computed independently:
// the result does not depend on the thread count.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "dpzo_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

// Function multiversioning: AVX2/AVX-512 clones of the hot loop, chosen at load time (no -march=native, so a
// cached build stays valid on another x86 CPU).  Exactness is unaffected: -ffp-contract=off forbids FMA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DPZO_MULTIVERSION __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define DPZO_MULTIVERSION
#endif

#if defined(__GNUC__)
#define DPZO_INLINE inline __attribute__((always_inline))  // so the ISA clones inline their helpers
#else
#define DPZO_INLINE inline
#endif

namespace dpzo {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kM1 = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kW0 = 0x9E3779B9u;  // key schedule (Weyl) increments
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kMinU = 1.0e-7f;
constexpr float kTwoPi = static_cast<float>(6.283185307179586);

constexpr int64_t BLOCK = 2048;  // stream indices per work item (LANES Rademacher groups)
constexpr int LANES = 16;        // Philox counters computed together (auto-vectorised)
constexpr int64_t GROUP = 128;   // Rademacher signs per Philox call
constexpr uint16_t kBf16NaN = 0xFFFF;  // what torch's CPU fp32 -> bf16 conversion gives for NaN

static_assert(BLOCK % (4 * LANES) == 0 && BLOCK == GROUP * LANES, "a block must hold whole Philox lane batches");

// Per-round key words: they depend only on the seed, so they are computed once per direction.
struct Key {
  uint32_t k0[kRounds];
  uint32_t k1[kRounds];
};

Key make_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);  // two's complement: seeds are taken mod 2^64
  Key key;
  uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  for (int r = 0; r < kRounds; ++r) {
    key.k0[r] = k0;
    key.k1[r] = k1;
    k0 += kW0;
    k1 += kW1;
  }
  return key;
}

// Philox4x32-10 on LANES consecutive counters q0 .. q0 + LANES - 1; w[word][lane].
DPZO_INLINE void philox_lanes(const Key& key, uint64_t q0, uint32_t w[4][LANES]) {
  uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
  for (int l = 0; l < LANES; ++l) {
    const uint64_t q = q0 + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(q);
    c1[l] = static_cast<uint32_t>(q >> 32);
    c2[l] = 0;
    c3[l] = 0;
  }
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t k0 = key.k0[r], k1 = key.k1[r];
    for (int l = 0; l < LANES; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kM1) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
  }
  std::memcpy(w[0], c0, sizeof(c0));
  std::memcpy(w[1], c1, sizeof(c1));
  std::memcpy(w[2], c2, sizeof(c2));
  std::memcpy(w[3], c3, sizeof(c3));
}

// Triton's uint32 -> [0, 1): int32 view, bitwise NOT if negative, fp32 conversion, fp32 scale.
DPZO_INLINE float uniform(uint32_t w) {
  const uint32_t folded = (w >> 31) ? ~w : w;
  return static_cast<float>(static_cast<int32_t>(folded)) * kUniformScale;
}

// Box-Muller on the 2 * LANES pairs of one Philox batch, written as quads into o.  Per pair, each step rounded
// to fp32:  a = max(u(wa), 1e-7);  r = sqrt(-2 fp32(ln a));  t = u(wb) * fp32(2 pi);  (r fp32(cos t), r fp32(sin t))
// with ln/cos/sin evaluated in double and correctly rounded (dpzo_math.h, vectorised; glibc where ambiguous).
DPZO_INLINE void box_muller_batch(const uint32_t w[4][LANES], float* o) {
  constexpr int P = 2 * LANES;  // pair l uses words (w0, w1) of lane l; pair LANES + l uses (w2, w3)
  float a[P], t[P], ln_a[P], sin_t[P], cos_t[P];
  for (int l = 0; l < LANES; ++l) {
    a[l] = std::max(uniform(w[0][l]), kMinU);
    a[LANES + l] = std::max(uniform(w[2][l]), kMinU);
    t[l] = uniform(w[1][l]) * kTwoPi;
    t[LANES + l] = uniform(w[3][l]) * kTwoPi;
  }
  math::log_f32(a, ln_a, P);
  math::sincos_f32(t, sin_t, cos_t, P);
  for (int l = 0; l < LANES; ++l) {
    const float r01 = std::sqrt(ln_a[l] * -2.0f);
    const float r23 = std::sqrt(ln_a[LANES + l] * -2.0f);
    o[4 * l] = r01 * cos_t[l];
    o[4 * l + 1] = r01 * sin_t[l];
    o[4 * l + 2] = r23 * cos_t[LANES + l];
    o[4 * l + 3] = r23 * sin_t[LANES + l];
  }
}

// Stream values of indices block_g + lo .. block_g + hi - 1 into out[lo .. hi) (out spans the whole block).
// block_g is a multiple of BLOCK; entries of out outside [lo, hi) may be written too.
DPZO_INLINE void fill_gaussian(const Key& key, uint64_t block_g, int64_t lo, int64_t hi, float* out) {
  const int64_t quad_lo = (lo >> 2) & ~static_cast<int64_t>(LANES - 1);
  const int64_t quad_hi = (hi + 3) >> 2;
  const uint64_t block_q = block_g >> 2;
  uint32_t w[4][LANES];
  for (int64_t q = quad_lo; q < quad_hi; q += LANES) {
    philox_lanes(key, block_q + static_cast<uint64_t>(q), w);
    box_muller_batch(w, out + 4 * q);
  }
}

constexpr uint32_t kBit[32] = {1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
                                1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
                                1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
                                1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

DPZO_INLINE void fill_rademacher(const Key& key, uint64_t block_g, int64_t lo, int64_t hi, float* out) {
  const int64_t group_lo = lo / GROUP;
  const int64_t group_hi = (hi + GROUP - 1) / GROUP;
  uint32_t w[4][LANES];
  philox_lanes(key, block_g / GROUP, w);  // the block holds exactly LANES groups
  for (int64_t grp = group_lo; grp < group_hi; ++grp) {
    float* o = out + GROUP * grp;
    for (int word = 0; word < 4; ++word) {
      const uint32_t bits = w[word][grp];
      // Constant per-lane masks instead of variable shifts, so the loop vectorises on plain SSE2.
      for (int b = 0; b < 32; ++b) o[32 * word + b] = (bits & kBit[b]) ? 1.0f : -1.0f;
    }
  }
}

DPZO_INLINE void fill(bool rademacher, const Key& key, uint64_t block_g, int64_t lo, int64_t hi, float* out) {
  if (rademacher)
    fill_rademacher(key, block_g, lo, hi, out);
  else
    fill_gaussian(key, block_g, lo, hi, out);
}

// 16 stochastic-rounding bits per index: low half of word g & 3 of Philox(rounding seed, g >> 2).
DPZO_INLINE void fill_rounding_bits(const Key& key, uint64_t block_g, int64_t lo, int64_t hi, uint32_t* out) {
  const int64_t quad_lo = (lo >> 2) & ~static_cast<int64_t>(LANES - 1);
  const int64_t quad_hi = (hi + 3) >> 2;
  uint32_t w[4][LANES];
  for (int64_t q = quad_lo; q < quad_hi; q += LANES) {
    philox_lanes(key, (block_g >> 2) + static_cast<uint64_t>(q), w);
    uint32_t* o = out + 4 * q;
    for (int l = 0; l < LANES; ++l)
      for (int word = 0; word < 4; ++word) o[4 * l + word] = w[word][l] & 0xFFFFu;
  }
}

DPZO_INLINE uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

DPZO_INLINE float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

DPZO_INLINE uint16_t bf16_nearest(float x) {
  if (std::isnan(x)) return kBf16NaN;
  const uint32_t u = f32_bits(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

DPZO_INLINE uint16_t bf16_stochastic(float x, uint32_t r) {
  if (!std::isfinite(x)) return bf16_nearest(x);
  return static_cast<uint16_t>((f32_bits(x) + r) >> 16);  // no uint32 overflow for finite x
}

DPZO_INLINE bool kept(const uint8_t* mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1u; }

// Blocks of BLOCK stream indices covering [offset, offset + n): block b spans buffer indices [lo_i, hi_i).
struct Blocks {
  uint64_t first;  // index of the first block (multiple of BLOCK after scaling)
  int64_t count;
  uint64_t g_lo, g_hi;

  Blocks(int64_t offset, int64_t n)
      : first(static_cast<uint64_t>(offset) / BLOCK),
        count(n == 0 ? 0 : static_cast<int64_t>((static_cast<uint64_t>(offset + n - 1) / BLOCK) - first + 1)),
        g_lo(static_cast<uint64_t>(offset)),
        g_hi(static_cast<uint64_t>(offset) + static_cast<uint64_t>(n)) {}  // may equal 2^63

  // Stream start of block b and its [lo, hi) range relative to that start.
  void span(int64_t b, uint64_t* block_g, int64_t* lo, int64_t* hi) const {
    const uint64_t g0 = (first + static_cast<uint64_t>(b)) * BLOCK;
    *block_g = g0;
    *lo = static_cast<int64_t>(std::max(g0, g_lo) - g0);
    *hi = static_cast<int64_t>(std::min(g0 + BLOCK, g_hi) - g0);
  }
};

int num_threads_for(int64_t blocks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
}

DPZO_MULTIVERSION
void directions_block(const Key& key, bool rademacher, const Blocks& blocks, int64_t b, float* z, float* dst) {
  uint64_t block_g;
  int64_t lo, hi;
  blocks.span(b, &block_g, &lo, &hi);
  fill(rademacher, key, block_g, lo, hi, z);
  const int64_t i0 = static_cast<int64_t>(block_g + lo - blocks.g_lo);
  std::memcpy(dst + i0, z + lo, sizeof(float) * (hi - lo));
}

at::Tensor directions(int64_t seed, int64_t offset, int64_t count, bool rademacher) {
  TORCH_CHECK(offset >= 0 && count >= 0, "directions: offset and count must be >= 0");
  at::Tensor out = at::empty({count}, at::dtype(at::kFloat));
  if (count == 0) return out;
  float* dst = out.data_ptr<float>();
  const Key key = make_key(seed);
  const Blocks blocks(offset, count);
  const int nthreads = num_threads_for(blocks.count);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> z(BLOCK);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks.count; ++b) directions_block(key, rademacher, blocks, b, z.data(), dst);
  }
  return out;
}

// Everything one pass needs, shared read-only by the threads.
struct ApplyPlan {
  Blocks blocks;
  bool rademacher;
  std::vector<Key> keys;  // one precomputed key schedule per direction
  std::vector<float> coefs;
  const uint8_t* mask;  // nullptr: every element kept
  bool stochastic;      // bf16 stochastic rounding
  Key rounding_key;
  float* buf_f32;  // exactly one of the two buffers is set
  uint16_t* buf_bf16;
};

// Per-thread scratch of one block.
struct Scratch {
  std::vector<float> z = std::vector<float>(BLOCK);
  std::vector<float> d = std::vector<float>(BLOCK);
  std::vector<uint32_t> rbits = std::vector<uint32_t>(BLOCK);
};

// One block: d = sum_j c_j z_j, then buf = round(buf + d) where the mask keeps the element.
// Compiled for several ISAs (picked at load time); every clone computes the same IEEE operations.
DPZO_MULTIVERSION
void apply_block(const ApplyPlan& p, int64_t b, Scratch& scratch) {
  uint64_t block_g;
  int64_t lo, hi;
  p.blocks.span(b, &block_g, &lo, &hi);
  const int64_t len = hi - lo;
  float* d = scratch.d.data();
  std::fill(d, d + len, 0.0f);
  for (size_t j = 0; j < p.keys.size(); ++j) {
    fill(p.rademacher, p.keys[j], block_g, lo, hi, scratch.z.data());
    const float cj = p.coefs[j];
    const float* z = scratch.z.data() + lo;
    for (int64_t k = 0; k < len; ++k) d[k] = d[k] + cj * z[k];
  }
  const int64_t i0 = static_cast<int64_t>(block_g + lo - p.blocks.g_lo);
  const uint8_t* mask = p.mask;
  if (p.buf_f32 != nullptr) {
    float* buf = p.buf_f32 + i0;
    for (int64_t k = 0; k < len; ++k) {
      const float x = buf[k] + d[k];
      buf[k] = (mask == nullptr || kept(mask, i0 + k)) ? x : buf[k];
    }
    return;
  }
  uint16_t* buf = p.buf_bf16 + i0;
  if (p.stochastic) {
    fill_rounding_bits(p.rounding_key, block_g, lo, hi, scratch.rbits.data());
    const uint32_t* r = scratch.rbits.data() + lo;
    for (int64_t k = 0; k < len; ++k) {
      const uint16_t x = bf16_stochastic(bf16_to_f32(buf[k]) + d[k], r[k]);
      buf[k] = (mask == nullptr || kept(mask, i0 + k)) ? x : buf[k];
    }
  } else {
    for (int64_t k = 0; k < len; ++k) {
      const uint16_t x = bf16_nearest(bf16_to_f32(buf[k]) + d[k]);
      buf[k] = (mask == nullptr || kept(mask, i0 + k)) ? x : buf[k];
    }
  }
}

void apply_directions(at::Tensor buf, at::Tensor seeds, at::Tensor coefs, bool rademacher, int64_t offset,
                      std::optional<at::Tensor> mask, bool stochastic, int64_t rounding_seed) {
  TORCH_CHECK(buf.device().is_cpu() && buf.dim() == 1 && buf.is_contiguous(),
              "apply_directions: buf must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(buf.scalar_type() == at::kFloat || buf.scalar_type() == at::kBFloat16,
              "apply_directions: buf must be float32 or bfloat16");
  TORCH_CHECK(seeds.scalar_type() == at::kLong && seeds.dim() == 1, "apply_directions: seeds must be int64[J]");
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.numel() == seeds.numel(),
              "apply_directions: coefs must be float32[J]");
  TORCH_CHECK(offset >= 0, "apply_directions: offset must be >= 0");
  const int64_t n = buf.numel();
  if (n == 0 || seeds.numel() == 0) return;
  const at::Tensor seeds_c = seeds.contiguous();
  const at::Tensor coefs_c = coefs.contiguous();
  at::Tensor mask_c;
  if (mask.has_value() && mask->defined()) {
    mask_c = mask->contiguous();
    TORCH_CHECK(mask_c.device().is_cpu() && mask_c.scalar_type() == at::kByte && mask_c.numel() >= (n + 7) / 8,
                "apply_directions: mask must be a uint8 CPU tensor of at least ceil(numel / 8) bytes");
  }
  const bool is_bf16 = buf.scalar_type() == at::kBFloat16;
  ApplyPlan plan{Blocks(offset, n),
                 rademacher,
                 {},
                 {},
                 mask_c.defined() ? mask_c.data_ptr<uint8_t>() : nullptr,
                 stochastic && is_bf16,  // fp32 buffers are exact either way
                 make_key(rounding_seed),
                 is_bf16 ? nullptr : buf.data_ptr<float>(),
                 is_bf16 ? reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>()) : nullptr};
  for (int64_t j = 0; j < seeds_c.numel(); ++j) {
    plan.keys.push_back(make_key(seeds_c.data_ptr<int64_t>()[j]));
    plan.coefs.push_back(coefs_c.data_ptr<float>()[j]);
  }
  const int nthreads = num_threads_for(plan.blocks.count);
#pragma omp parallel num_threads(nthreads)
  {
    Scratch scratch;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < plan.blocks.count; ++b) apply_block(plan, b, scratch);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_aggregate(at::Tensor D, double clip, double scale,
                                                                          bool per_direction) {
  TORCH_CHECK(D.device().is_cpu() && D.dim() == 2 && D.scalar_type() == at::kFloat,
              "clip_aggregate: D must be a float32 [B, K] CPU tensor");
  const at::Tensor Dc = D.contiguous();
  const int64_t B = Dc.size(0), K = Dc.size(1);
  at::Tensor sums = at::zeros({K}, at::dtype(at::kDouble));
  at::Tensor raw = at::zeros({K}, at::dtype(at::kDouble));
  double* s = sums.data_ptr<double>();
  double* rs = raw.data_ptr<double>();
  const float* src = Dc.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);  // the reference multiplies by fp32(scale) in fp32
  int64_t n_clipped = 0, n_bad = 0;
  std::vector<double> a(K);
  for (int64_t row = 0; row < B; ++row) {
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float v = src[row * K + k] * scale_f;
      finite = finite && std::isfinite(v);
      a[k] = static_cast<double>(v);
    }
    if (!finite) {
      ++n_bad;
      continue;
    }
    for (int64_t k = 0; k < K; ++k) rs[k] += a[k];
    if (per_direction) {
      bool over = false;
      for (int64_t k = 0; k < K; ++k) {
        over = over || std::fabs(a[k]) > clip;
        s[k] += std::min(std::max(a[k], -clip), clip);
      }
      n_clipped += over;
    } else {
      double sq = 0.0;
      for (int64_t k = 0; k < K; ++k) sq += a[k] * a[k];
      const double norm = std::sqrt(sq);
      const bool over = norm > clip;
      const double factor = over ? clip / norm : 1.0;
      for (int64_t k = 0; k < K; ++k) s[k] += over ? a[k] * factor : a[k];
      n_clipped += over;
    }
  }
  return {sums, raw, at::scalar_tensor(n_clipped, at::dtype(at::kLong)),
          at::scalar_tensor(n_bad, at::dtype(at::kLong))};
}

constexpr int kHookChunk = 256;

DPZO_MULTIVERSION  // the same clones as apply_block, so the hook tests the code the kernels run
void transcendental_chunk(const float* src, float* dst, int len, int64_t op, bool vectorized) {
  float other[kHookChunk];
  if (!vectorized) {
    for (int i = 0; i < len; ++i) {
      const double v = static_cast<double>(src[i]);
      dst[i] = static_cast<float>(op == 0 ? std::log(v) : op == 1 ? std::sin(v) : std::cos(v));
    }
  } else if (op == 0) {
    math::log_f32(src, dst, len);
  } else if (op == 1) {
    math::sincos_f32(src, dst, other, len);
  } else {
    math::sincos_f32(src, other, dst, len);
  }
}

// Testing hook: fp32(op(double(x))) for op 0 = ln, 1 = sin, 2 = cos, by the vectorised path with its exactness
// guard or by plain glibc, so tests can compare both (and the reference) on any set of fp32 inputs.
at::Tensor transcendental(at::Tensor x, int64_t op, bool vectorized) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "transcendental: x must be a float32 CPU tensor");
  TORCH_CHECK(op >= 0 && op <= 2, "transcendental: op must be 0 (ln), 1 (sin) or 2 (cos)");
  const at::Tensor xc = x.contiguous();
  // The domains the stream uses (and the vectorised reduction is made for): ln on [1e-7, 1), sin/cos on [0, 2 pi).
  const bool in_domain = op == 0 ? (xc.ge(kMinU).all().item<bool>() && xc.lt(1.0f).all().item<bool>())
                                 : (xc.ge(0.0f).all().item<bool>() && xc.le(kTwoPi).all().item<bool>());
  TORCH_CHECK(in_domain, "transcendental: arguments outside the stream's domain");
  at::Tensor out = at::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = xc.numel();
  constexpr int64_t kChunk = kHookChunk;
  const int nthreads = num_threads_for((n + kChunk - 1) / kChunk);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    transcendental_chunk(src + i0, dst + i0, static_cast<int>(std::min(kChunk, n - i0)), op, vectorized);
  }
  return out;
}

}  // namespace
}  // namespace dpzo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpzo-engine C++/OpenMP CPU kernels (bit-exact with the PyTorch reference)";
  m.def("directions", &dpzo::directions, "Stream values offset .. offset+count-1 of one seed (fp32)",
        py::arg("seed"), py::arg("offset"), py::arg("count"), py::arg("rademacher"),
        py::call_guard<py::gil_scoped_release>());
  m.def("apply_directions", &dpzo::apply_directions, "buf += sum_j coefs[j] * z_j in one pass (in place)",
        py::arg("buf"), py::arg("seeds"), py::arg("coefs"), py::arg("rademacher"), py::arg("offset"),
        py::arg("mask"), py::arg("stochastic"), py::arg("rounding_seed"), py::call_guard<py::gil_scoped_release>());
  m.def("_transcendental", &dpzo::transcendental, "Testing hook: fp32 of ln/sin/cos evaluated in double",
        py::arg("x"), py::arg("op"), py::arg("vectorized"), py::call_guard<py::gil_scoped_release>());
  m.def("clip_aggregate", &dpzo::clip_aggregate, "Per-example clip and column sums (fp64)", py::arg("D"),
        py::arg("clip"), py::arg("scale"), py::arg("per_direction"), py::call_guard<py::gil_scoped_release>());
}
