// The AVX2 build of the stream kernels (8 lanes), compiled for AVX2 whatever the baseline flags; the bindings
// call it only when the CPU reports AVX2.  No FMA: plain intrinsics, and -ffp-contract=off for the loops.
#include <cstdint>

#include "kernels_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2")
#include <immintrin.h>

namespace dpzo {
namespace isa_avx2 {
namespace {
#include "simd_avx2.inc"
namespace gaussian_path {  // four registers per value (8 lanes each)
#define DPZO_WAYS 4
#include "simd_ways.inc"
#undef DPZO_WAYS
#include "stream_kernels.inc"
}  // namespace gaussian_path
namespace rademacher_path {  // two registers per value (16 counters: 2048 signs, one block)
#define DPZO_WAYS 2
#include "simd_ways.inc"
#undef DPZO_WAYS
#include "stream_kernels.inc"
}  // namespace rademacher_path
#include "stream_dispatch.inc"
}  // namespace
}  // namespace isa_avx2

const IsaKernels* avx2_kernels() {
  static const IsaKernels kernels{"avx2", isa_avx2::directions, isa_avx2::apply, isa_avx2::box_muller_hook};
  return &kernels;
}

}  // namespace dpzo
#else
namespace dpzo {
const IsaKernels* avx2_kernels() { return nullptr; }
}  // namespace dpzo
#endif
