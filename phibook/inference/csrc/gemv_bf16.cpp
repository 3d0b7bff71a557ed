// A few bf16 rows times a bf16 weight matrix: a decode step's linears at batch 1 to 16
// (phibook.inference.kernels, used by FastForward).
//
// y[i, r] = sum_k W[r, k] * x[i, k] + bias[r], W (rows, cols) row-major bf16, x (m <= 16, cols) bf16, products
// summed in fp32 by AVX512-BF16's dot-product instruction (vdpbf16ps: 32 bf16 pairs into 16 fp32
// lanes), y rounded to bf16 (nearest even) once at the end. Decode reads every weight once per
// token, so the speed is how fast W streams from memory: rows are split across torch's own
// intra-op threads (at::parallel_for) and each weight row is read once for all m input rows.
//
// Built by torch.utils.cpp_extension with -mavx512bf16 and called only where the CPU has the
// flag and the kernel passed its check (phibook.inference.kernels, probe "gemv-bf16"). Built with
// -mavx2 -mfma -DPHIBOOK_EMULATE_AVX512 instead, it runs in software (emulated_avx512.h), so a CPU
// without AVX512-BF16 checks its logic too (tests only).
// PHIBOOK_GEMV_NS names the operator namespace (kernels.GemvBuild.namespace).
//
// PHIBOOK_GEMV_STREAMS (default 1) is how many runs of weight rows a thread reads side by side for
// one input row. 1 is the build that serves (measured on an AVX-512 Xeon, sixth session); 4, as
// decode_f32.cpp reads, is a candidate bench/bench_gemv.py times beside it (kernels.GEMV_CANDIDATES):
// four streams a thread read faster than one on an AVX2 EPYC; two changed nothing here on a Zen 4
// EPYC; four are untimed on any AVX512-BF16 CPU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#ifdef PHIBOOK_EMULATE_AVX512
#include "emulated_avx512.h"  // AVX-512 in software: a check of this file's logic on any x86 CPU
#else
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#ifndef PHIBOOK_GEMV_NS
#error "build with -DPHIBOOK_GEMV_NS=<operator namespace>"
#endif
#ifndef PHIBOOK_GEMV_STREAMS
#define PHIBOOK_GEMV_STREAMS 1
#endif

namespace {

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline __m512bh load_bh(const uint16_t* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(reinterpret_cast<const void*>(p)));
}

constexpr int64_t kMaxRows = 16;  // input rows per call: a batched decode step's, at most

// A tile: R weight rows times MT input rows, R * MT accumulators; per 32 columns R + MT loads
// feed R * MT dot products (a 4 x 4 tile: 8 loads, 16 products).
template <int R, int MT>
inline void tile(const uint16_t* w, const uint16_t* x, const float* bias, uint16_t* y, int64_t rows, int64_t cols,
                 int64_t r, int64_t t) {
  __m512 acc[R][MT];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < MT; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < cols; k += 32) {
    __m512bh xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = load_bh(x + (t + i) * cols + k);
    for (int j = 0; j < R; ++j) {
      const __m512bh wv = load_bh(w + (r + j) * cols + k);
      for (int i = 0; i < MT; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv, xv[i]);
    }
  }
  for (int j = 0; j < R; ++j) {
    const float b = bias ? bias[r + j] : 0.0f;
    for (int i = 0; i < MT; ++i) y[(t + i) * rows + r + j] = to_bf16(_mm512_reduce_add_ps(acc[j][i]) + b);
  }
}

template <int R>
inline void tiles_for_rows(const uint16_t* w, const uint16_t* x, const float* bias, uint16_t* y, int64_t m,
                           int64_t rows, int64_t cols, int64_t r) {
  // The R weight rows stay in L1/L2 while every 4-row tile of x passes over them.
  int64_t t = 0;
  for (; t + 4 <= m; t += 4) tile<R, 4>(w, x, bias, y, rows, cols, r, t);
  switch (m - t) {
    case 3: tile<R, 3>(w, x, bias, y, rows, cols, r, t); break;
    case 2: tile<R, 2>(w, x, bias, y, rows, cols, r, t); break;
    case 1: tile<R, 1>(w, x, bias, y, rows, cols, r, t); break;
    default: break;
  }
}

void rows_block_many(const uint16_t* w, const uint16_t* x, const float* bias, uint16_t* y, int64_t m, int64_t rows,
                     int64_t cols, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) tiles_for_rows<4>(w, x, bias, y, m, rows, cols, r);
  for (; r < r1; ++r) tiles_for_rows<1>(w, x, bias, y, m, rows, cols, r);
}

// One input row dotted with weight rows r, r + rs, ..., r + (S - 1) rs (one from each of S runs),
// two accumulators each over k.
template <int S>
inline void dot_rows(const uint16_t* w, const uint16_t* x, const float* bias, uint16_t* y, int64_t cols, int64_t r,
                     int64_t rs) {
  const uint16_t* wr[S];
  __m512 a[S], b[S];
  for (int s = 0; s < S; ++s) {
    wr[s] = w + (r + s * rs) * cols;
    a[s] = _mm512_setzero_ps();
    b[s] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 64 <= cols; k += 64) {
    const __m512bh x0 = load_bh(x + k), x1 = load_bh(x + k + 32);
    for (int s = 0; s < S; ++s) {
      a[s] = _mm512_dpbf16_ps(a[s], load_bh(wr[s] + k), x0);
      b[s] = _mm512_dpbf16_ps(b[s], load_bh(wr[s] + k + 32), x1);
    }
  }
  if (k < cols) {  // cols is a multiple of 32: one vector left
    const __m512bh x0 = load_bh(x + k);
    for (int s = 0; s < S; ++s) a[s] = _mm512_dpbf16_ps(a[s], load_bh(wr[s] + k), x0);
  }
  for (int s = 0; s < S; ++s)
    y[r + s * rs] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a[s], b[s])) + (bias ? bias[r + s * rs] : 0.0f));
}

constexpr int kStreams = PHIBOOK_GEMV_STREAMS;
static_assert(kStreams >= 1 && kStreams <= 8, "PHIBOOK_GEMV_STREAMS: 1 to 8 runs a thread");

// One input row. kStreams > 1: rows [r0, r1) as kStreams runs of q rows read side by side (row i of
// every run at once), then the rows left over one by one. kStreams == 1: four accumulators over k
// keep the dot-product units busy; the rows of a thread's share are one contiguous run of memory, a
// single forward stream.
void rows_block_one(const uint16_t* w, const uint16_t* x, const float* bias, uint16_t* y, int64_t cols,
                    int64_t r0, int64_t r1) {
  if constexpr (kStreams > 1) {
    const int64_t q = (r1 - r0) / kStreams;
    for (int64_t i = 0; i < q; ++i) dot_rows<kStreams>(w, x, bias, y, cols, r0 + i, q);
    for (int64_t r = r0 + kStreams * q; r < r1; ++r) dot_rows<1>(w, x, bias, y, cols, r, 1);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* wr = w + r * cols;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= cols; k += 128) {
      a0 = _mm512_dpbf16_ps(a0, load_bh(wr + k), load_bh(x + k));
      a1 = _mm512_dpbf16_ps(a1, load_bh(wr + k + 32), load_bh(x + k + 32));
      a2 = _mm512_dpbf16_ps(a2, load_bh(wr + k + 64), load_bh(x + k + 64));
      a3 = _mm512_dpbf16_ps(a3, load_bh(wr + k + 96), load_bh(x + k + 96));
    }
    for (; k < cols; k += 32) a0 = _mm512_dpbf16_ps(a0, load_bh(wr + k), load_bh(x + k));
    const float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    y[r] = to_bf16(s + (bias ? bias[r] : 0.0f));
  }
}

at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& bias_fp32) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "gemv_bf16: weight must be a contiguous 2-D bf16 tensor");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(cols % 32 == 0, "gemv_bf16: the input width must be a multiple of 32, got ", cols);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == cols,
              "gemv_bf16: x must be (m, ", cols, ") bf16");
  const int64_t m = x.size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "gemv_bf16: x must have 1 to ", kMaxRows, " rows, got ", m);
  TORCH_CHECK(bias_fp32.numel() == 0 || (bias_fp32.scalar_type() == at::kFloat && bias_fp32.numel() == rows &&
                                         bias_fp32.is_contiguous()),
              "gemv_bf16: bias must be empty or ", rows, " contiguous fp32 values");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, rows}, weight.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const float* bp = bias_fp32.numel() ? bias_fp32.data_ptr<float>() : nullptr;
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  // Grain of 64 weight rows (256 KiB of a 2048-wide weight): enough per task that scheduling is noise.
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    if (m == 1) {
      rows_block_one(wp, xp, bp, yp, cols, r0, r1);
    } else {
      rows_block_many(wp, xp, bp, yp, m, rows, cols, r0, r1);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(PHIBOOK_GEMV_NS, m) {
  m.def("gemv_bf16(Tensor weight, Tensor x, Tensor bias_fp32) -> Tensor");
}

TORCH_LIBRARY_IMPL(PHIBOOK_GEMV_NS, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
}
