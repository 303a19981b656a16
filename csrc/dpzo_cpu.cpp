// Torch bindings of the C++/OpenMP CPU kernels (docs/design.md sections 2 and 4; the stream spec is
// dpzo_engine/core/stream.py and dpzo_engine/core/gaussian.py, stream version 2).
//
// The stream kernels themselves live in stream_kernels.inc, built three times: scalar (isa_scalar.cpp), AVX2
// (isa_avx2.cpp) and AVX-512 (isa_avx512.cpp).  The best build the CPU supports is chosen at load time
// (CPUID); DPZO_CPU_ISA=scalar|avx2|avx512 or set_isa() forces one.  All builds perform the reference's IEEE
// fp32 operations (or, in a few marked steps, other exact operations with the same results), so they return the
// same bits as each other, as the PyTorch reference and as Triton.
//
// Work is split into blocks of kBlock stream indices aligned to multiples of kBlock; every element is computed
// from its own stream index only, so the result depends neither on the thread count nor on the ISA.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels_api.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // MXCSR: the flush-to-zero test of the box_muller hook
#define DPZO_HAS_MXCSR 1
#else
#define DPZO_HAS_MXCSR 0
#endif

namespace dpzo {
namespace {

constexpr uint32_t kW0 = 0x9E3779B9u;  // Philox key schedule (Weyl) increments
constexpr uint32_t kW1 = 0xBB67AE85u;

Key make_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);  // two's complement: seeds are taken mod 2^64
  Key key;
  uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    key.k0[r] = k0;
    key.k1[r] = k1;
    k0 += kW0;
    k1 += kW1;
  }
  return key;
}

// ------------------------------------------------------------------------------------------- ISA choice
bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx2") return avx2_kernels() != nullptr && __builtin_cpu_supports("avx2");
  if (isa == "avx512")
    return avx512_kernels() != nullptr && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
  return isa == "scalar";
}

const IsaKernels* kernels_for(const std::string& isa) {
  if (isa == "avx512") return avx512_kernels();
  if (isa == "avx2") return avx2_kernels();
  return &scalar_kernels();
}

const IsaKernels* best_kernels() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_has(isa)) return kernels_for(isa);
  return &scalar_kernels();
}

const IsaKernels* g_kernels = nullptr;

void set_isa(const std::string& isa) {
  TORCH_CHECK(isa == "auto" || isa == "scalar" || isa == "avx2" || isa == "avx512",
              "set_isa: expected auto, scalar, avx2 or avx512, got '", isa, "'");
  if (isa == "auto") {
    g_kernels = best_kernels();
    return;
  }
  TORCH_CHECK(cpu_has(isa), "set_isa: this CPU (or this build) has no ", isa, " path");
  g_kernels = kernels_for(isa);
}

const IsaKernels& kernels() {
  if (g_kernels == nullptr) {
    const char* env = std::getenv("DPZO_CPU_ISA");
    set_isa(env != nullptr && env[0] != '\0' ? env : "auto");
  }
  return *g_kernels;
}

std::string isa() { return kernels().name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* name : {"scalar", "avx2", "avx512"})
    if (cpu_has(name)) out.emplace_back(name);
  return out;
}

// ------------------------------------------------------------------------------------------- blocks
// Blocks of kBlock stream indices covering [offset, offset + n): block b spans stream indices [lo, hi).
struct Blocks {
  uint64_t first;
  int64_t count;
  uint64_t g_lo, g_hi;

  Blocks(int64_t offset, int64_t n)
      : first(static_cast<uint64_t>(offset) / kBlock),
        count(n == 0 ? 0 : static_cast<int64_t>((static_cast<uint64_t>(offset + n - 1) / kBlock) - first + 1)),
        g_lo(static_cast<uint64_t>(offset)),
        g_hi(static_cast<uint64_t>(offset) + static_cast<uint64_t>(n)) {}  // may equal 2^63

  // Element range [i0, i1) (relative to offset) of block b.
  void span(int64_t b, int64_t* i0, int64_t* i1) const {
    const uint64_t g0 = (first + static_cast<uint64_t>(b)) * kBlock;
    *i0 = static_cast<int64_t>(std::max(g0, g_lo) - g_lo);
    *i1 = static_cast<int64_t>(std::min(g0 + kBlock, g_hi) - g_lo);
  }
};

// Blocks are handed out dynamically, kBlocksPerGrab at a time (16 K stream indices, ~20 us of Gaussian work):
// on a shared machine a thread that is preempted no longer holds up a fixed half of the range while the other
// waits at the barrier.  The results do not depend on who computes which block.
constexpr int kBlocksPerGrab = 8;

int num_threads_for(int64_t blocks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
}

// ------------------------------------------------------------------------------------------- kernels
at::Tensor directions(int64_t seed, int64_t offset, int64_t count, bool rademacher, std::optional<at::Tensor> into) {
  TORCH_CHECK(offset >= 0 && count >= 0, "directions: offset and count must be >= 0");
  at::Tensor out = into.has_value() && into->defined() ? *into : at::empty({count}, at::dtype(at::kFloat));
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == count,
              "directions: out must be a contiguous float32 CPU tensor of count elements");
  if (count == 0) return out;
  float* dst = out.data_ptr<float>();
  const Key key = make_key(seed);
  const Blocks blocks(offset, count);
  const IsaKernels& k = kernels();
  const int nthreads = num_threads_for(blocks.count);
#pragma omp parallel for schedule(dynamic, kBlocksPerGrab) num_threads(nthreads)
  for (int64_t b = 0; b < blocks.count; ++b) {
    int64_t i0, i1;
    blocks.span(b, &i0, &i1);
    k.directions(key, rademacher, blocks.g_lo + static_cast<uint64_t>(i0), i1 - i0, dst + i0);
  }
  return out;
}

void apply_directions(at::Tensor buf, at::Tensor seeds, at::Tensor coefs, bool rademacher, int64_t offset,
                      std::optional<at::Tensor> mask, bool stochastic, int64_t rounding_seed,
                      std::optional<at::Tensor> cache, int64_t cache_read, int64_t cache_write) {
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
  const bool cached = cache.has_value() && cache->defined();
  if (cached) {
    TORCH_CHECK(!rademacher, "apply_directions: the direction cache is for Gaussian directions");
    TORCH_CHECK(cache->device().is_cpu() && cache->scalar_type() == at::kFloat && cache->dim() == 1 &&
                    cache->is_contiguous() && cache->numel() <= n,
                "apply_directions: cache must be a contiguous float32 CPU tensor of at most numel elements");
    TORCH_CHECK(cache_read >= -1 && cache_read < seeds.numel() && cache_write >= -1 && cache_write < seeds.numel(),
                "apply_directions: cache_read and cache_write must be -1 or a direction index");
    TORCH_CHECK(cache_read < 0 || cache_write < 0 || cache_write > cache_read,
                "apply_directions: cache_write must come after cache_read");
  }
  std::vector<Key> keys;
  for (int64_t j = 0; j < seeds_c.numel(); ++j) keys.push_back(make_key(seeds_c.data_ptr<int64_t>()[j]));
  const bool is_bf16 = buf.scalar_type() == at::kBFloat16;
  const ApplyPlan plan{static_cast<uint64_t>(offset),
                       rademacher,
                       seeds_c.numel(),
                       keys.data(),
                       coefs_c.data_ptr<float>(),
                       mask_c.defined() ? mask_c.data_ptr<uint8_t>() : nullptr,
                       stochastic && is_bf16,  // fp32 buffers are exact either way
                       make_key(rounding_seed),
                       is_bf16 ? nullptr : buf.data_ptr<float>(),
                       is_bf16 ? reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>()) : nullptr,
                       cached ? cache->data_ptr<float>() : nullptr,
                       cached ? cache->numel() : 0,
                       cached ? cache_read : -1,
                       cached ? cache_write : -1};
  const Blocks blocks(offset, n);
  const IsaKernels& k = kernels();
  const int nthreads = num_threads_for(blocks.count);
#pragma omp parallel for schedule(dynamic, kBlocksPerGrab) num_threads(nthreads)
  for (int64_t b = 0; b < blocks.count; ++b) {
    int64_t i0, i1;
    blocks.span(b, &i0, &i1);
    k.apply(plan, i0, i1);
  }
}

// Testing hook: the Gaussian transform of given uniforms, by the current ISA build.  flush_denormals runs it with
// the CPU flushing subnormal inputs and results to zero (MXCSR FTZ + DAZ, as a GPU's .ftz): equal results show
// that no intermediate is subnormal, so a flushing backend could not differ.
std::tuple<at::Tensor, at::Tensor> box_muller(at::Tensor ua, at::Tensor ub, bool flush_denormals) {
  TORCH_CHECK(!flush_denormals || DPZO_HAS_MXCSR, "box_muller: flush_denormals needs an x86 CPU (MXCSR)");
  TORCH_CHECK(ua.device().is_cpu() && ub.device().is_cpu() && ua.scalar_type() == at::kFloat &&
                  ub.scalar_type() == at::kFloat && ua.numel() == ub.numel(),
              "box_muller: ua and ub must be float32 CPU tensors of one size");
  const at::Tensor a = ua.contiguous(), b = ub.contiguous();
  TORCH_CHECK(a.ge(0.0f).all().item<bool>() && a.lt(1.0f).all().item<bool>() && b.ge(0.0f).all().item<bool>() &&
                  b.lt(1.0f).all().item<bool>(),
              "box_muller: uniforms must lie in [0, 1)");
  at::Tensor zc = at::empty_like(a), zs = at::empty_like(a);
  const int64_t n = a.numel();
  constexpr int64_t kChunk = 4096;
  const IsaKernels& k = kernels();
  const int nthreads = num_threads_for((n + kChunk - 1) / kChunk);
#pragma omp parallel num_threads(nthreads)
  {
#if DPZO_HAS_MXCSR
    const unsigned int csr = _mm_getcsr();
    if (flush_denormals) _mm_setcsr(csr | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t m = std::min(kChunk, n - i0);
      k.box_muller(a.data_ptr<float>() + i0, b.data_ptr<float>() + i0, m, zc.data_ptr<float>() + i0,
                   zs.data_ptr<float>() + i0);
    }
#if DPZO_HAS_MXCSR
    _mm_setcsr(csr);
#endif
  }
  return {zc, zs};
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

}  // namespace
}  // namespace dpzo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpzo-engine C++/OpenMP CPU kernels (stream version 2; bit-exact with the PyTorch reference)";
  m.def("directions", &dpzo::directions, "Stream values offset .. offset+count-1 of one seed (fp32)",
        py::arg("seed"), py::arg("offset"), py::arg("count"), py::arg("rademacher"), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("apply_directions", &dpzo::apply_directions, "buf += sum_j coefs[j] * z_j in one pass (in place)",
        py::arg("buf"), py::arg("seeds"), py::arg("coefs"), py::arg("rademacher"), py::arg("offset"),
        py::arg("mask"), py::arg("stochastic"), py::arg("rounding_seed"), py::arg("cache") = py::none(),
        py::arg("cache_read") = -1, py::arg("cache_write") = -1, py::call_guard<py::gil_scoped_release>());
  m.def("clip_aggregate", &dpzo::clip_aggregate, "Per-example clip and column sums (fp64)", py::arg("D"),
        py::arg("clip"), py::arg("scale"), py::arg("per_direction"), py::call_guard<py::gil_scoped_release>());
  m.def("_box_muller", &dpzo::box_muller, "Testing hook: the Gaussian transform of given uniforms", py::arg("ua"),
        py::arg("ub"), py::arg("flush_denormals") = false, py::call_guard<py::gil_scoped_release>());
  m.def("isa", &dpzo::isa, "The instruction-set build the kernels run (scalar, avx2, avx512)");
  m.def("available_isas", &dpzo::available_isas, "The builds this CPU can run");
  m.def("set_isa", &dpzo::set_isa, "Force a build (auto, scalar, avx2, avx512); all give the same bits",
        py::arg("isa"));
}
