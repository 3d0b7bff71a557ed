// AVX-512 intrinsics in software, so the AVX-512 branches of decode_f32.cpp and gemv_bf16.cpp can
// run, and be checked against float64, on a CPU without AVX-512 (phibook.inference.kernels,
// emulated_builds; tests/test_emulated_avx512.py). Never used for real work: the emulation checks
// the kernels' logic (tiles, tails, strides, reductions, rounding), not their speed.
//
// Included by those sources only when built with -DPHIBOOK_EMULATE_AVX512 (and -mavx2 -mfma).
// SIMDe (the Debian package libsimde-dev, header-only) supplies the intrinsics under their own
// names (SIMDE_ENABLE_NATIVE_ALIASES); the three below are missing from SIMDe 0.7 and written here
// plainly, lane by lane, from Intel's definitions.

#pragma once

#include <immintrin.h>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <algorithm>
#include <cstdint>

namespace phibook_emulated {

// 16 unsigned 16-bit integers zero-extended to 32 bits (vpmovzxwd).
inline __m512i cvtepu16_epi32(__m256i a) {
  uint16_t in[16];
  int32_t out[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return _mm512_loadu_si512(out);
}

// The sum of 16 fp32 lanes, halves added pairwise as the compilers' sequence does.
inline float reduce_add_ps(__m512 a) {
  float v[16];
  _mm512_storeu_ps(v, a);
  for (int width = 8; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) v[i] += v[i + width];
  return v[0];
}

inline float reduce_max_ps(__m512 a) {
  float v[16];
  _mm512_storeu_ps(v, a);
  for (int width = 8; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) v[i] = std::max(v[i], v[i + width]);
  return v[0];
}

}  // namespace phibook_emulated

#define _mm512_cvtepu16_epi32(a) phibook_emulated::cvtepu16_epi32(a)
#define _mm512_reduce_add_ps(a) phibook_emulated::reduce_add_ps(a)
#define _mm512_reduce_max_ps(a) phibook_emulated::reduce_max_ps(a)
