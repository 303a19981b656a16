// The AVX-512 build of the stream kernels (16 lanes), compiled for AVX-512 F/DQ/BW/VL whatever the baseline
// flags; the bindings call it only when the CPU reports those.  No FMA: plain intrinsics, and
// -ffp-contract=off for the loops (AVX-512F implies FMA instructions exist, so that flag matters here).
#include <cstdint>

#include "kernels_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl")
#include <immintrin.h>

namespace dpzo {
namespace isa_avx512 {
namespace {
#include "simd_avx512.inc"
namespace gaussian_path {  // four registers per value (16 lanes each)
#define DPZO_WAYS 4
#include "simd_ways.inc"
#undef DPZO_WAYS
#include "stream_kernels.inc"
}  // namespace gaussian_path
namespace rademacher_path {  // one register per value (16 counters: 2048 signs, one block)
#define DPZO_WAYS 1
#include "simd_ways.inc"
#undef DPZO_WAYS
#include "stream_kernels.inc"
}  // namespace rademacher_path
#include "stream_dispatch.inc"
}  // namespace
}  // namespace isa_avx512

const IsaKernels* avx512_kernels() {
  static const IsaKernels kernels{"avx512", isa_avx512::directions, isa_avx512::apply, isa_avx512::box_muller_hook};
  return &kernels;
}

}  // namespace dpzo
#else
namespace dpzo {
const IsaKernels* avx512_kernels() { return nullptr; }
}  // namespace dpzo
#endif
