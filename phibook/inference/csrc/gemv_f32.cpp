// A few fp32 rows times an fp32 weight matrix: a decode step's linears at batch 1 to 16
// (phibook.inference.kernels, used by FastForward), the fp32 sibling of gemv_bf16.cpp.
//
// y[i, r] = sum_k W[r, k] * x[i, k] + bias[r], W (rows, cols) row-major fp32, x (m <= 16, cols)
// fp32, summed in fp32 with fused multiply-adds. Decode reads every weight once per token, so the
// speed is how fast W streams from memory: rows are split across torch's own intra-op threads
// (at::parallel_for) and each weight row is read once for all m input rows.
//
// One source, two builds, chosen by phibook.inference.kernels from the CPU's flags and the ISA
// level ATen runs at: -mavx512f (16 lanes, 32 registers: 4 x 4 tiles) and -mavx2 -mfma (8 lanes,
// 16 registers: 2 x 4 tiles). PHIBOOK_GEMV_NS names the operator namespace of each build, so the
// two never clash in one process.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>

#ifndef PHIBOOK_GEMV_NS
#error "build with -DPHIBOOK_GEMV_NS=<operator namespace>"
#endif

namespace {

#if defined(__AVX512F__)
using vec = __m512;
constexpr int64_t kLanes = 16;
constexpr int kTileRows = 4;  // weight rows per tile: 4 x 4 accumulators + 4 inputs + 1 weight of 32 registers
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec acc) { return _mm512_fmadd_ps(a, b, acc); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int64_t kLanes = 8;
constexpr int kTileRows = 2;  // 2 x 4 accumulators + 4 inputs + 1 weight of 16 registers
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec acc) { return _mm256_fmadd_ps(a, b, acc); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
#else
#error "build with -mavx512f, or with -mavx2 -mfma"
#endif

constexpr int64_t kMaxRows = 16;  // input rows per call: a batched decode step's, at most

// A tile: R weight rows times MT input rows, R * MT accumulators; per kLanes columns R + MT loads
// feed R * MT multiply-adds.
template <int R, int MT>
inline void tile(const float* w, const float* x, const float* bias, float* y, int64_t rows, int64_t cols, int64_t r,
                 int64_t t) {
  vec acc[R][MT];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < MT; ++i) acc[j][i] = vzero();
  for (int64_t k = 0; k < cols; k += kLanes) {
    vec xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = vload(x + (t + i) * cols + k);
    for (int j = 0; j < R; ++j) {
      const vec wv = vload(w + (r + j) * cols + k);
      for (int i = 0; i < MT; ++i) acc[j][i] = vfma(wv, xv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < R; ++j) {
    const float b = bias ? bias[r + j] : 0.0f;
    for (int i = 0; i < MT; ++i) y[(t + i) * rows + r + j] = vsum(acc[j][i]) + b;
  }
}

template <int R>
inline void tiles_for_rows(const float* w, const float* x, const float* bias, float* y, int64_t m, int64_t rows,
                           int64_t cols, int64_t r) {
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

void rows_block_many(const float* w, const float* x, const float* bias, float* y, int64_t m, int64_t rows,
                     int64_t cols, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kTileRows <= r1; r += kTileRows) tiles_for_rows<kTileRows>(w, x, bias, y, m, rows, cols, r);
  for (; r < r1; ++r) tiles_for_rows<1>(w, x, bias, y, m, rows, cols, r);
}

// One input row: four accumulators over k keep the FMA units busy; a thread's rows are one
// contiguous run of memory, a single forward stream.
void rows_block_one(const float* w, const float* x, const float* bias, float* y, int64_t cols, int64_t r0,
                    int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * cols;
    vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int64_t k = 0;
    for (; k + 4 * kLanes <= cols; k += 4 * kLanes) {
      a0 = vfma(vload(wr + k), vload(x + k), a0);
      a1 = vfma(vload(wr + k + kLanes), vload(x + k + kLanes), a1);
      a2 = vfma(vload(wr + k + 2 * kLanes), vload(x + k + 2 * kLanes), a2);
      a3 = vfma(vload(wr + k + 3 * kLanes), vload(x + k + 3 * kLanes), a3);
    }
    for (; k < cols; k += kLanes) a0 = vfma(vload(wr + k), vload(x + k), a0);
    y[r] = vsum(vadd(vadd(a0, a1), vadd(a2, a3))) + (bias ? bias[r] : 0.0f);
  }
}

at::Tensor gemv_f32(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "gemv_f32: weight must be a contiguous 2-D fp32 tensor");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(cols % 32 == 0, "gemv_f32: the input width must be a multiple of 32, got ", cols);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == cols, "gemv_f32: x must be (m, ", cols,
              ") fp32");
  const int64_t m = x.size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "gemv_f32: x must have 1 to ", kMaxRows, " rows, got ", m);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == rows && bias.is_contiguous()),
              "gemv_f32: bias must be empty or ", rows, " contiguous fp32 values");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, rows}, weight.options());
  const float* wp = weight.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Grain of 32 weight rows (256 KiB of a 2048-wide weight): enough per task that scheduling is noise.
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
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
  m.def("gemv_f32(Tensor weight, Tensor x, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(PHIBOOK_GEMV_NS, CPU, m) {
  m.impl("gemv_f32", &gemv_f32);
}
