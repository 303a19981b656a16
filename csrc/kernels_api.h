// What the per-ISA kernel builds (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp) share with the torch bindings.
//
// No torch and no std:: templates here: this header is included by translation units compiled for different
// instruction sets, and an inline function shared between them could be linked from the wrong one.
#pragma once

#include <cstdint>

namespace dpzo {

constexpr int kPhiloxRounds = 10;
constexpr int64_t kBlock = 2048;  // stream indices per unit of parallel work (a multiple of 128 and of 4 * 16)

// Per-round Philox key words of one seed: key = (seed lo32, seed hi32), bumped by the Weyl constants.
struct Key {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
};

// Everything one apply_directions pass needs, shared read-only by the threads.
struct ApplyPlan {
  uint64_t offset;  // stream index of buffer element 0
  bool rademacher;
  int64_t num_dirs;
  const Key* keys;      // num_dirs key schedules
  const float* coefs;   // num_dirs fp32 coefficients
  const uint8_t* mask;  // nullptr: every element kept; else bit i & 7 of byte i >> 3
  bool stochastic;      // bf16 stochastic rounding (16 bits per element from rounding_key)
  Key rounding_key;
  float* buf_f32;  // exactly one of the two buffers is set
  uint16_t* buf_bf16;
  // Direction cache (Gaussian only; see apply_gaussian): fp32 values of buffer elements [0, cache_len), or
  // nullptr.  cache_read: the direction it holds on entry (-1: none used); cache_write: the direction it
  // must hold on return (-1: none).
  float* cache;
  int64_t cache_len;
  int64_t cache_read;
  int64_t cache_write;
};

// One instruction-set build of the kernels.  Every build performs the same IEEE fp32 operations (no FMA), so
// all of them return the same bits; only the number of lanes differs.
struct IsaKernels {
  const char* name;  // "scalar", "avx2", "avx512"
  // Stream values of indices g0 .. g0 + count - 1 into out (count <= 2**62).
  void (*directions)(const Key& key, bool rademacher, uint64_t g0, int64_t count, float* out);
  // buf[i] <- round(buf[i] + sum_j coefs[j] z_j[offset + i]) for buffer elements i0 <= i < i1.
  void (*apply)(const ApplyPlan& plan, int64_t i0, int64_t i1);
  // Testing hook: the Gaussian transform on given uniforms (zc = r cos 2 pi ub, zs = r sin 2 pi ub).
  void (*box_muller)(const float* ua, const float* ub, int64_t n, float* zc, float* zs);
};

const IsaKernels& scalar_kernels();
const IsaKernels* avx2_kernels();    // nullptr when this build has no AVX2 path
const IsaKernels* avx512_kernels();  // nullptr when this build has no AVX-512 path

}  // namespace dpzo
