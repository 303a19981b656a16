// The portable build of the stream kernels: one lane, any CPU.  Compiled with the baseline flags.
#include <cstdint>

#include "kernels_api.h"

namespace dpzo {
namespace isa_scalar {
namespace {
#include "simd_scalar.inc"
#include "stream_kernels.inc"
}  // namespace
}  // namespace isa_scalar

const IsaKernels& scalar_kernels() {
  static const IsaKernels kernels{"scalar", isa_scalar::directions, isa_scalar::apply, isa_scalar::box_muller_hook};
  return kernels;
}

}  // namespace dpzo
