// Vectorisable ln / cos / sin of fp32 arguments, evaluated in double and rounded once to fp32.
//
// The stream needs fp32(ln a), fp32(cos t), fp32(sin t) of the *correctly rounded* values (DESIGN section 2).
// glibc's scalar double functions do that in practice but cost ~150 cycles per Box-Muller pair; these
// branch-free fdlibm-style polynomials (no FMA: build with -ffp-contract=off) run on SIMD lanes instead.
//
// Exactness guard (Ziv's rounding test): each double result y is within a few ulps of the true value, and so
// are glibc's and the PyTorch reference's (fp64 evaluated, then rounded).  If y - e and y + e (e = 2^-45 |y|,
// far more than all those errors) round to the same fp32, every one of those values rounds to it too, so the
// fp32 result is the correctly rounded one.  Otherwise (about 1 call in 10^6) the lane is recomputed with
// glibc, exactly what the scalar code did.  So this path returns glibc-then-round bit for bit on every input.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define DPZO_MATH_INLINE inline __attribute__((always_inline))  // inlined into each ISA clone of the caller
#else
#define DPZO_MATH_INLINE inline
#endif

namespace dpzo {
namespace math {

constexpr double kGuard = 0x1p-45;  // relative half-width of the rounding test

// fdlibm e_log.c
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kLg1 = 6.666666666666735130e-01;
constexpr double kLg2 = 3.999999999940941908e-01;
constexpr double kLg3 = 2.857142874366239149e-01;
constexpr double kLg4 = 2.222219843214978396e-01;
constexpr double kLg5 = 1.818357216161805012e-01;
constexpr double kLg6 = 1.531383769920937332e-01;
constexpr double kLg7 = 1.479819860511658591e-01;

// fdlibm k_sin.c / k_cos.c / e_rem_pio2.c
constexpr double kS1 = -1.66666666666666324348e-01;
constexpr double kS2 = 8.33333333332248946124e-03;
constexpr double kS3 = -1.98412698298579493134e-04;
constexpr double kS4 = 2.75573137070700676789e-06;
constexpr double kS5 = -2.50507602534068634195e-08;
constexpr double kS6 = 1.58969099521155010221e-10;
constexpr double kC1 = 4.16666666666666019037e-02;
constexpr double kC2 = -1.38888888888741095749e-03;
constexpr double kC3 = 2.48015872894767294178e-05;
constexpr double kC4 = -2.75573143513906633035e-07;
constexpr double kC5 = 2.08757232129817482790e-09;
constexpr double kC6 = -1.13596475577881948265e-11;
constexpr double kInvPio2 = 6.36619772367581382433e-01;
constexpr double kPio2_1 = 1.57079632673412561417e+00;   // first 33 bits of pi/2: n * kPio2_1 is exact
constexpr double kPio2_1t = 6.07710050650619224932e-11;  // pi/2 - kPio2_1
constexpr double kRoundShift = 0x1.8p52;                  // (x + shift) - shift rounds x to an integer

DPZO_MATH_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

DPZO_MATH_INLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// 1 where fp32 rounding of y is ambiguous at the guard width.
DPZO_MATH_INLINE int32_t ambiguous(double y) {
  const double e = std::fabs(y) * kGuard;
  return static_cast<float>(y - e) != static_cast<float>(y + e);
}

// ln(a) in double for a normal positive fp32 a (here a in [1e-7, 1)); fdlibm's log, error < 1 ulp.
DPZO_MATH_INLINE double log_of_float(float a) {
  // a = 2^k m with m in [sqrt(2)/2, sqrt(2)), split on the fp32 bits (musl's logf trick).
  const uint32_t ia = bits_of(a) + (0x3f800000u - 0x3f3504f3u);
  const int32_t k = static_cast<int32_t>(ia >> 23) - 127;
  const float m = float_of((ia & 0x007fffffu) + 0x3f3504f3u);
  const double f = static_cast<double>(m) - 1.0;  // exact
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (kLg2 + w * (kLg4 + w * kLg6));
  const double t2 = z * (kLg1 + w * (kLg3 + w * (kLg5 + w * kLg7)));
  const double r = t2 + t1;
  const double hfsq = 0.5 * f * f;
  const double dk = static_cast<double>(k);
  return s * (hfsq + r) + dk * kLn2Lo - hfsq + f + dk * kLn2Hi;
}

// (sin t, cos t) in double for fp32 t in [0, 8): Cody-Waite reduction by pi/2 and fdlibm's kernels.
// For fp32 t the reduced argument is 0 or at least ~4e-8 away from 0, so two pi/2 parts suffice.
DPZO_MATH_INLINE void sincos_of_float(float t, double* sin_out, double* cos_out) {
  const double x = static_cast<double>(t);
  const double fn = (x * kInvPio2 + kRoundShift) - kRoundShift;
  const int32_t n = static_cast<int32_t>(fn);
  const double r = (x - fn * kPio2_1) - fn * kPio2_1t;
  const double z = r * r;
  const double w = z * z;
  // __kernel_sin(r, 0, 0)
  const double rs = kS2 + z * (kS3 + z * kS4) + z * w * (kS5 + z * kS6);
  const double sin_r = r + (z * r) * (kS1 + z * rs);
  // __kernel_cos(r, 0)
  const double rc = z * (kC1 + z * (kC2 + z * kC3)) + w * w * (kC4 + z * (kC5 + z * kC6));
  const double hz = 0.5 * z;
  const double one_minus_hz = 1.0 - hz;
  const double cos_r = one_minus_hz + (((1.0 - one_minus_hz) - hz) + z * rc);
  const int32_t q = n & 3;
  const double s = (q & 1) ? cos_r : sin_r;
  const double c = (q & 1) ? sin_r : cos_r;
  *sin_out = (q & 2) ? -s : s;                   // q: 0 -> s, 1 -> c, 2 -> -s, 3 -> -c
  *cos_out = ((q + 1) & 2) ? -c : c;              // q: 0 -> c, 1 -> -s, 2 -> -c, 3 -> s
}

// fp32(ln a[i]) for n values, correctly rounded (glibc for the rare ambiguous lanes).
DPZO_MATH_INLINE void log_f32(const float* a, float* out, int n) {
  int32_t redo = 0;
  for (int i = 0; i < n; ++i) {
    const double y = log_of_float(a[i]);
    out[i] = static_cast<float>(y);
    redo |= ambiguous(y);
  }
  if (redo) {
    for (int i = 0; i < n; ++i)
      if (ambiguous(log_of_float(a[i]))) out[i] = static_cast<float>(std::log(static_cast<double>(a[i])));
  }
}

// fp32(sin t[i]) and fp32(cos t[i]) for n values, correctly rounded (glibc for the rare ambiguous lanes).
DPZO_MATH_INLINE void sincos_f32(const float* t, float* sin_out, float* cos_out, int n) {
  int32_t redo = 0;
  for (int i = 0; i < n; ++i) {
    double s, c;
    sincos_of_float(t[i], &s, &c);
    sin_out[i] = static_cast<float>(s);
    cos_out[i] = static_cast<float>(c);
    redo |= ambiguous(s) | ambiguous(c);
  }
  if (redo) {
    for (int i = 0; i < n; ++i) {
      double s, c;
      sincos_of_float(t[i], &s, &c);
      if (ambiguous(s)) sin_out[i] = static_cast<float>(std::sin(static_cast<double>(t[i])));
      if (ambiguous(c)) cos_out[i] = static_cast<float>(std::cos(static_cast<double>(t[i])));
    }
  }
}

}  // namespace math
}  // namespace dpzo
