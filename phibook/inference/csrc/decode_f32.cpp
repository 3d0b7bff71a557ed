// A decode step's kernels in fp32 arithmetic (phibook.inference.kernels, used by FastForward): the
// linears at batch 1 to 16 (gemv_f32 for an fp32 model; gemv_bf16 for a bf16 one on a CPU without
// bf16 dot products, its weights widened to fp32 as read: the sibling of gemv_bf16.cpp, which
// needs AVX512-BF16), one query's attention over the KV cache (attention_f32) and the elementwise
// work around it (split_rotary, merge_gelu, attend_step, add_layer_norm).
//
// gemv_f32 / gemv_bf16:
// y[i, r] = sum_k W[r, k] * x[i, k] + bias[r], W (rows, cols) row-major fp32 or bf16, x (m <= 16,
// cols) in W's dtype, summed in fp32 with fused multiply-adds. Decode reads every weight once per
// token, so the speed is how fast W streams from memory: rows are split across torch's own
// intra-op threads (at::parallel_for) and each weight row is read once for all m input rows. A
// thread reads its rows as several runs at once (kStreams for one input row, a tile's rows for
// more), each front to back: one sequential stream per thread left bandwidth unused on an AVX2
// EPYC (docs/performance.md).
//
// One source, two builds, chosen by phibook.inference.kernels from the CPU's flags and the ISA
// level ATen runs at: -mavx512f (16 lanes, 32 registers: 4 x 4 tiles) and -mavx2 -mfma (8 lanes,
// 16 registers: 2 x 4 tiles). PHIBOOK_GEMV_NS names the operator namespace of each build, so the
// two never clash in one process. A third build, -mavx2 -mfma -DPHIBOOK_EMULATE_AVX512, runs the
// AVX-512 branch in software (emulated_avx512.h) so CPUs without AVX-512 check it too; tests only.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#ifdef PHIBOOK_EMULATE_AVX512
#include "emulated_avx512.h"  // AVX-512 in software: a check of this file's logic on any x86 CPU
#else
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifndef PHIBOOK_GEMV_NS
#error "build with -DPHIBOOK_GEMV_NS=<operator namespace>"
#endif

namespace {

#if defined(__AVX512F__) || defined(PHIBOOK_EMULATE_AVX512)
using vec = __m512;
constexpr int64_t kLanes = 16;
constexpr int kTileRows = 4;  // weight rows per tile: 4 x 4 accumulators + 4 inputs + 1 weight of 32 registers
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
// 16 bf16 values (their bits) widened to fp32: a bf16 is the top half of an fp32.
inline vec vload(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline vec vfma(vec a, vec b, vec acc) { return _mm512_fmadd_ps(a, b, acc); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vset1(float f) { return _mm512_set1_ps(f); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline float vhmax(vec v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int64_t kLanes = 8;
constexpr int kTileRows = 2;  // 2 x 4 accumulators + 4 inputs + 1 weight of 16 registers
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const uint16_t* p) {  // 8 bf16 values (their bits) widened to fp32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline vec vfma(vec a, vec b, vec acc) { return _mm256_fmadd_ps(a, b, acc); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline float vsum(vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
inline vec vset1(float f) { return _mm256_set1_ps(f); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline float vhmax(vec v) {
  const __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
#else
#error "build with -mavx512f, or with -mavx2 -mfma"
#endif

constexpr int64_t kMaxRows = 16;  // input rows per call: a batched decode step's, at most

// bf16 values travel as their bits (uint16_t): the conversions below are plain integer and float
// operations the compiler vectorizes, where c10::BFloat16's per-value NaN branch stops it.
inline float widen(float x) { return x; }
inline float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}
// To the model's dtype as ATen's .to() rounds: to nearest, ties to even; a NaN stays a (quiet) NaN.
inline void narrow_to(float x, float* out) { *out = x; }
inline void narrow_to(float x, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  *out = x != x ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}

// The GEMV's weights are fp32 (W = float) or bf16 bits (W = uint16_t, widened to fp32 as read:
// half the bytes to stream, the same fused multiply-adds); its input rows are fp32 (a bf16 input
// is widened once before the rows are split); its output is the weight's dtype (Y = W).

// A tile: R weight rows times MT input rows, R * MT accumulators; per kLanes columns R + MT loads
// feed R * MT multiply-adds.
// Weight rows r, r + rs, ..., r + (R - 1) rs: adjacent rows (rs = 1) or one row from each of R runs.
template <int R, int MT, typename W, typename Y>
inline void tile(const W* w, const float* x, const float* bias, Y* y, int64_t rows, int64_t cols, int64_t r,
                 int64_t rs, int64_t t) {
  vec acc[R][MT];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < MT; ++i) acc[j][i] = vzero();
  for (int64_t k = 0; k < cols; k += kLanes) {
    vec xv[MT];
    for (int i = 0; i < MT; ++i) xv[i] = vload(x + (t + i) * cols + k);
    for (int j = 0; j < R; ++j) {
      const vec wv = vload(w + (r + j * rs) * cols + k);
      for (int i = 0; i < MT; ++i) acc[j][i] = vfma(wv, xv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < R; ++j) {
    const float b = bias ? bias[r + j * rs] : 0.0f;
    for (int i = 0; i < MT; ++i) narrow_to(vsum(acc[j][i]) + b, y + (t + i) * rows + r + j * rs);
  }
}

template <int R, typename W, typename Y>
inline void tiles_for_rows(const W* w, const float* x, const float* bias, Y* y, int64_t m, int64_t rows,
                           int64_t cols, int64_t r, int64_t rs) {
  // The R weight rows stay in L1/L2 while every 4-row tile of x passes over them.
  int64_t t = 0;
  for (; t + 4 <= m; t += 4) tile<R, 4>(w, x, bias, y, rows, cols, r, rs, t);
  switch (m - t) {
    case 3: tile<R, 3>(w, x, bias, y, rows, cols, r, rs, t); break;
    case 2: tile<R, 2>(w, x, bias, y, rows, cols, r, rs, t); break;
    case 1: tile<R, 1>(w, x, bias, y, rows, cols, r, rs, t); break;
    default: break;
  }
}

// Rows [r0, r1) as kTileRows runs of q rows: tile i takes row i of every run, so the thread reads
// kTileRows streams at once; the rows left over (fewer than kTileRows) go one by one.
template <typename W, typename Y>
void rows_block_many(const W* w, const float* x, const float* bias, Y* y, int64_t m, int64_t rows, int64_t cols,
                     int64_t r0, int64_t r1) {
  const int64_t q = (r1 - r0) / kTileRows;
  for (int64_t i = 0; i < q; ++i) tiles_for_rows<kTileRows>(w, x, bias, y, m, rows, cols, r0 + i, q);
  for (int64_t r = r0 + kTileRows * q; r < r1; ++r) tiles_for_rows<1>(w, x, bias, y, m, rows, cols, r, 1);
}

// One input row dotted with weight rows r, r + rs, ..., r + (S - 1) rs, two accumulators each over k.
template <int S, typename W, typename Y>
inline void dot_rows(const W* w, const float* x, const float* bias, Y* y, int64_t cols, int64_t r, int64_t rs) {
  const W* wr[S];
  vec a[S], b[S];
  for (int s = 0; s < S; ++s) {
    wr[s] = w + (r + s * rs) * cols;
    a[s] = vzero();
    b[s] = vzero();
  }
  for (int64_t k = 0; k < cols; k += 2 * kLanes) {  // cols is a multiple of 32 (checked), of 2 * kLanes
    const vec x0 = vload(x + k), x1 = vload(x + k + kLanes);
    for (int s = 0; s < S; ++s) {
      a[s] = vfma(vload(wr[s] + k), x0, a[s]);
      b[s] = vfma(vload(wr[s] + k + kLanes), x1, b[s]);
    }
  }
  for (int s = 0; s < S; ++s) narrow_to(vsum(vadd(a[s], b[s])) + (bias ? bias[r + s * rs] : 0.0f), y + r + s * rs);
}

// One input row: rows [r0, r1) as kStreams runs of q rows read side by side (row i of every run at
// once), then the rows left over one by one.
constexpr int kStreams = 4;

template <typename W, typename Y>
void rows_block_one(const W* w, const float* x, const float* bias, Y* y, int64_t cols, int64_t r0, int64_t r1) {
  const int64_t q = (r1 - r0) / kStreams;
  for (int64_t i = 0; i < q; ++i) dot_rows<kStreams>(w, x, bias, y, cols, r0 + i, q);
  for (int64_t r = r0 + kStreams * q; r < r1; ++r) dot_rows<1>(w, x, bias, y, cols, r, 1);
}

// The checks both GEMV ops make; returns (rows, cols, m).
std::tuple<int64_t, int64_t, int64_t> gemv_shapes(const char* op, const char* dtype, at::ScalarType type,
                                                  const at::Tensor& weight, const at::Tensor& x,
                                                  const at::Tensor& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == type && weight.is_contiguous(), op,
              ": weight must be a contiguous 2-D ", dtype, " tensor");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(cols % 32 == 0, op, ": the input width must be a multiple of 32, got ", cols);
  TORCH_CHECK(x.scalar_type() == type && x.dim() == 2 && x.size(1) == cols, op, ": x must be (m, ", cols, ") ",
              dtype);
  const int64_t m = x.size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxRows, op, ": x must have 1 to ", kMaxRows, " rows, got ", m);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.numel() == rows && bias.is_contiguous()),
              op, ": bias must be empty or ", rows, " contiguous fp32 values");
  return {rows, cols, m};
}

template <typename W, typename Y>
void gemv_rows(const W* w, const float* x, const float* bias, Y* y, int64_t m, int64_t rows, int64_t cols) {
  // Grain of 32 weight rows (256 KiB of a 2048-wide fp32 weight): enough per task that scheduling is noise.
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
    if (m == 1) {
      rows_block_one(w, x, bias, y, cols, r0, r1);
    } else {
      rows_block_many(w, x, bias, y, m, rows, cols, r0, r1);
    }
  });
}

at::Tensor gemv_f32(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& bias) {
  const auto [rows, cols, m] = gemv_shapes("gemv_f32", "fp32", at::kFloat, weight, x, bias);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({m, rows}, weight.options());
  gemv_rows(weight.data_ptr<float>(), xc.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr,
            y.data_ptr<float>(), m, rows, cols);
  return y;
}

// gemv_bf16: the same for a bf16 model on a CPU without bf16 dot products (AVX2, AVX-512F): W and
// x bf16, bias fp32 (or empty), y bf16. x is widened to fp32 once; the weight is read as bf16 and
// widened in registers, products and sums in fp32, y rounded to bf16 once at the end (nearest even).
at::Tensor gemv_bf16(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& bias) {
  const auto [rows, cols, m] = gemv_shapes("gemv_bf16", "bf16", at::kBFloat16, weight, x, bias);
  const at::Tensor xc = x.contiguous();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  std::vector<float> xf(m * cols);
  for (int64_t i = 0; i < m * cols; ++i) xf[i] = widen(xb[i]);
  at::Tensor y = at::empty({m, rows}, weight.options());
  gemv_rows(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), xf.data(),
            bias.numel() ? bias.data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
            m, rows, cols);
  return y;
}

// exp(t) for t in [-87, 88] (inputs outside are clamped): t = n ln2 + r with |r| <= ln2 / 2, exp(r) by
// its Taylor series to r^7 (relative error under 1e-8 there), 2^n built in the exponent bits.
inline float exp_clamped(float t) {
  t = std::min(std::max(t, -87.0f), 88.0f);
  const float n = std::nearbyint(t * 1.44269504088896341f);
  const float r = (t - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln2 in two parts
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The scores of keys [t, t + 4) for one query: four independent dot products at a time, so the
// multiply-adds of one key do not wait on each other's latency.
template <typename KV>
inline void scores4(const float* q, const KV* k, int64_t k_row, int64_t D, float scale, float* p) {
  vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
  for (int64_t d = 0; d < D; d += kLanes) {
    const vec qd = vload(q + d);
    a0 = vfma(qd, vload(k + d), a0);
    a1 = vfma(qd, vload(k + k_row + d), a1);
    a2 = vfma(qd, vload(k + 2 * k_row + d), a2);
    a3 = vfma(qd, vload(k + 3 * k_row + d), a3);
  }
  p[0] = vsum(a0) * scale;
  p[1] = vsum(a1) * scale;
  p[2] = vsum(a2) * scale;
  p[3] = vsum(a3) * scale;
}

// out[0, N * kLanes) += sum_t p[t] v[t, 0, N * kLanes): N accumulators held in registers over all
// S keys (a key whose weight is exactly 0, a masked one, is skipped).
template <int N, typename KV>
inline void weigh_values(const float* p, const KV* v, int64_t v_row, int64_t S, float* out) {
  vec acc[N];
  for (int j = 0; j < N; ++j) acc[j] = vzero();
  for (int64_t t = 0; t < S; ++t) {
    if (p[t] == 0.0f) continue;
    const vec w = vset1(p[t]);
    const KV* vt = v + t * v_row;
    for (int j = 0; j < N; ++j) acc[j] = vfma(w, vload(vt + j * kLanes), acc[j]);
  }
  for (int j = 0; j < N; ++j) vstore(out + j * kLanes, acc[j]);
}

template <typename KV>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mp, int64_t mask_row,
                 int64_t mask_col, at::Tensor& out) {
  const int64_t H = k.size(1), S = k.size(2), D = k.size(3);
  const float* qp = q.data_ptr<float>();
  const KV* kp = static_cast<const KV*>(k.data_ptr());
  const KV* vp = static_cast<const KV*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const int64_t k_row = k.stride(2), v_row = v.stride(2);
  at::parallel_for(0, k.size(0) * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const float* qh = qp + b * q.stride(0) + h * q.stride(1);
      const KV* kh = kp + b * k.stride(0) + h * k.stride(1);
      const KV* vh = vp + b * v.stride(0) + h * v.stride(1);
      int64_t t = 0;
      for (; t + 4 <= S; t += 4) scores4(qh, kh + t * k_row, k_row, D, scale, &p[t]);
      for (; t < S; ++t) {
        vec a = vzero();
        for (int64_t d = 0; d < D; d += kLanes) a = vfma(vload(qh + d), vload(kh + t * k_row + d), a);
        p[t] = vsum(a) * scale;
      }
      if (mp) {
        const bool* m = mp + b * mask_row;
        for (t = 0; t < S; ++t) p[t] = m[t * mask_col] ? p[t] : minus_inf;
      }
      vec top_v = vset1(minus_inf);
      for (t = 0; t + kLanes <= S; t += kLanes) top_v = vmax(top_v, vload(&p[t]));
      float top = vhmax(top_v);
      for (; t < S; ++t) top = std::max(top, p[t]);
      // A masked key weighs exactly 0 (exp_clamped alone would give exp(-87)); with every key
      // masked, top is -inf, every weight 0 and the row NaN (0 / 0), as SDPA gives. A plain loop
      // the compiler vectorizes, then the sum in vector lanes.
      for (t = 0; t < S; ++t) p[t] = p[t] == minus_inf ? 0.0f : exp_clamped(p[t] - top);
      vec sum_v = vzero();
      for (t = 0; t + kLanes <= S; t += kLanes) sum_v = vadd(sum_v, vload(&p[t]));
      float sum = vsum(sum_v);
      for (; t < S; ++t) sum += p[t];
      float* o = op + i * D;
      int64_t d = 0;
      for (; d + 8 * kLanes <= D; d += 8 * kLanes) weigh_values<8>(p.data(), vh + d, v_row, S, o + d);
      for (; d + 4 * kLanes <= D; d += 4 * kLanes) weigh_values<4>(p.data(), vh + d, v_row, S, o + d);
      for (; d < D; d += kLanes) weigh_values<1>(p.data(), vh + d, v_row, S, o + d);
      const float inv = 1.0f / sum;
      for (d = 0; d < D; ++d) o[d] *= inv;
    }
  });
}

// attention_f32: softmax(q k^T / sqrt(D) + mask) v for ONE query per (batch row, head), the decode
// step's attention, in fp32. q (B, H, 1, D) fp32; k, v (B, H, S, D) views of the cache (any
// strides, the last dimension contiguous), both fp32 or both bf16: a bf16 model's keys and values
// are bf16 values (apply_rotary rounds to the model's dtype), so a bf16 cache holds them exactly in
// half the bytes, widened here as they are read; mask empty or bool (1 or B, 1, 1, S), false = not
// seen. Each (row, head) reads its S cached keys and values once, as one forward stream each; the
// pairs are split across torch's threads. ATen's CPU flash attention read a cold cache at half
// this speed for one query (docs/performance.md). A row with every key masked gives NaN, as SDPA
// does; phibook's masks never build one (model.causal_mask: every query sees its own key).
at::Tensor attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_f32: q, k, v must be 4-D (B, H, S, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "attention_f32: q must be fp32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "attention_f32: k and v must be both fp32 or both bf16");
  const int64_t B = k.size(0), H = k.size(1), S = k.size(2), D = k.size(3);
  TORCH_CHECK(q.size(0) == B && q.size(1) == H && q.size(2) == 1 && q.size(3) == D, "attention_f32: q must be (",
              B, ", ", H, ", 1, ", D, ")");
  TORCH_CHECK(v.sizes() == k.sizes(), "attention_f32: v must have k's shape");
  TORCH_CHECK(D % 16 == 0, "attention_f32: the head size must be a multiple of 16, got ", D);
  TORCH_CHECK(S >= 1, "attention_f32: no cached keys");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attention_f32: the last dimension of q, k and v must be contiguous");
  const bool* mp = nullptr;
  int64_t mask_row = 0, mask_col = 0;
  if (mask.numel()) {
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) &&
                    mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == S,
                "attention_f32: mask must be bool (1 or ", B, ", 1, 1, ", S, ")");
    mp = mask.data_ptr<bool>();
    mask_row = mask.size(0) == 1 ? 0 : mask.stride(0);
    mask_col = mask.stride(3);
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (k.scalar_type() == at::kFloat) {
    attend_rows<float>(q, k, v, mp, mask_row, mask_col, out);
  } else {
    attend_rows<uint16_t>(q, k, v, mp, mask_row, mask_col, out);
  }
  return out;
}

// split_rotary and merge_gelu: the elementwise work of a decode step's block between its two
// GEMVs, which ATen runs as some 20 ops a layer (slices, a negation, concatenations, dtype
// conversions, the rotary products, GELU), each a dispatch costing more than its arithmetic. One
// row runs on the calling thread (a few thousand values: waking a thread costs more), a batch's
// rows are split across torch's threads; plain loops the compiler vectorizes, reading the model's
// dtype (bf16 or fp32) directly.

// f(b0, b1) over rows [0, B): on the calling thread for one row, else split across torch's threads.
template <typename F>
void over_rows(int64_t B, const F& f) {
  if (B <= 1) {
    f(0, B);
  } else {
    at::parallel_for(0, B, 1, f);
  }
}

// A value the model's dtype can hold (what apply_rotary's .to(x.dtype) leaves), back in fp32.
template <typename T>
inline float round_as(float x) {
  T t;
  narrow_to(x, &t);
  return widen(t);
}

// qkv (3, B, H, 1, D) fp32 from u (B, 1, >= 3 H D), the input projection's output [q | k | v | fc1]
// in the model's dtype: q and k rotated on their first R channels by cos and sin (B or 1, 1, 1, R)
// as phibook.model.model.apply_rotary does (products in fp32, the result rounded to the model's
// dtype), v as it is; all widened to fp32 for the cache and attention.
template <typename T>
void split_rotary_rows(const T* u, int64_t u_row, const float* cos, const float* sin, int64_t cs_row, float* out,
                       int64_t B, int64_t H, int64_t D, int64_t R, int64_t b0, int64_t b1) {
  const int64_t half = R / 2, d = H * D;
  for (int64_t b = b0; b < b1; ++b) {
    const T* row = u + b * u_row;
    const float* c = cos + b * cs_row;
    const float* s = sin + b * cs_row;
    for (int64_t part = 0; part < 3; ++part) {
      for (int64_t h = 0; h < H; ++h) {
        const T* x = row + part * d + h * D;
        float* o = out + ((part * B + b) * H + h) * D;
        int64_t i = 0;
        if (part < 2) {
          for (; i < half; ++i) {
            const float x1 = widen(x[i]), x2 = widen(x[i + half]);
            o[i] = round_as<T>(x1 * c[i] - x2 * s[i]);
            o[i + half] = round_as<T>(x2 * c[i + half] + x1 * s[i + half]);
          }
          i = R;
        }
        for (; i < D; ++i) o[i] = widen(x[i]);
      }
    }
  }
}

at::Tensor split_rotary(const at::Tensor& u, const at::Tensor& cos, const at::Tensor& sin, int64_t n_head,
                        int64_t head_dim) {
  TORCH_CHECK(u.dim() == 3 && u.size(1) == 1 && u.stride(2) == 1, "split_rotary: u must be (B, 1, N), the last "
              "dimension contiguous");
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kBFloat16, "split_rotary: u must be fp32 or bf16");
  const int64_t B = u.size(0), H = n_head, D = head_dim;
  TORCH_CHECK(H >= 1 && D >= 1 && 3 * H * D <= u.size(2), "split_rotary: u has ", u.size(2),
              " channels, fewer than q, k and v's 3 x ", H, " x ", D);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.sizes() == sin.sizes() &&
                  cos.strides() == sin.strides() && cos.dim() == 4 && (cos.size(0) == 1 || cos.size(0) == B) &&
                  cos.size(1) == 1 && cos.size(2) == 1 && cos.stride(3) == 1,
              "split_rotary: cos and sin must be fp32 (1 or B, 1, 1, R), alike, the last dimension contiguous");
  const int64_t R = cos.size(3);
  TORCH_CHECK(R % 2 == 0 && R <= D, "split_rotary: the rotary width must be even and at most the head size, got ", R);
  at::Tensor out = at::empty({3, B, H, 1, D}, u.options().dtype(at::kFloat));
  const int64_t cs_row = cos.size(0) == 1 ? 0 : cos.stride(0);
  over_rows(B, [&](int64_t b0, int64_t b1) {
    if (u.scalar_type() == at::kFloat) {
      split_rotary_rows(u.data_ptr<float>(), u.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(), cs_row,
                        out.data_ptr<float>(), B, H, D, R, b0, b1);
    } else {
      split_rotary_rows(static_cast<const uint16_t*>(u.data_ptr()), u.stride(0), cos.data_ptr<float>(),
                        sin.data_ptr<float>(), cs_row, out.data_ptr<float>(), B, H, D, R, b0, b1);
    }
  });
  return out;
}

// GELU, tanh form: 0.5 x (1 + tanh(a)) = x / (1 + exp(-2a)), a = sqrt(2/pi) (x + 0.044715 x^3).
inline float gelu_tanh(float x) {
  const float a = 0.797884560802865355f * (x + 0.044715f * x * x * x);
  return x / (1.0f + exp_clamped(-2.0f * a));
}

template <typename T>
void merge_gelu_rows(const float* y, int64_t y_row, const T* u, int64_t u_row, T* out, int64_t d, int64_t ff,
                     int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* yb = y + b * y_row;
    const T* g = u + b * u_row + 3 * d;
    T* o = out + b * (d + ff);
    for (int64_t i = 0; i < d; ++i) narrow_to(yb[i], o + i);
    // In chunks through an fp32 buffer: three simple loops vectorize, one mixing widths did not.
    float buf[256];
    for (int64_t start = 0; start < ff; start += 256) {
      const int64_t n = std::min<int64_t>(256, ff - start);
      for (int64_t i = 0; i < n; ++i) buf[i] = widen(g[start + i]);
      for (int64_t i = 0; i < n; ++i) buf[i] = gelu_tanh(buf[i]);
      for (int64_t i = 0; i < n; ++i) narrow_to(buf[i], o + d + start + i);
    }
  }
}

// (B, 1, d + F) in u's dtype: [y | gelu_tanh(u[..., 3d:])], the output projection's input, from the
// attention output y (B, H, 1, D) fp32 (heads side by side, rounded to the dtype) and the input
// projection's output u (B, 1, 3d + F): its fc1 part through GELU in fp32, rounded once.
at::Tensor merge_gelu(const at::Tensor& y, const at::Tensor& u) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 4 && y.size(2) == 1, "merge_gelu: y must be fp32 (B, H, 1, D)");
  TORCH_CHECK(u.dim() == 3 && u.size(1) == 1 && u.stride(2) == 1 &&
                  (u.scalar_type() == at::kFloat || u.scalar_type() == at::kBFloat16),
              "merge_gelu: u must be fp32 or bf16 (B, 1, N), the last dimension contiguous");
  const int64_t B = y.size(0), d = y.size(1) * y.size(3);
  TORCH_CHECK(u.size(0) == B && u.size(2) > 3 * d, "merge_gelu: u must be (", B, ", 1, N) with N > ", 3 * d);
  const at::Tensor yc = y.contiguous();
  const int64_t ff = u.size(2) - 3 * d;
  at::Tensor out = at::empty({B, 1, d + ff}, u.options().memory_format(at::MemoryFormat::Contiguous));
  over_rows(B, [&](int64_t b0, int64_t b1) {
    if (u.scalar_type() == at::kFloat) {
      merge_gelu_rows(yc.data_ptr<float>(), d, u.data_ptr<float>(), u.stride(0), out.data_ptr<float>(), d, ff, b0, b1);
    } else {
      merge_gelu_rows(yc.data_ptr<float>(), d, static_cast<const uint16_t*>(u.data_ptr()), u.stride(0),
                      static_cast<uint16_t*>(out.data_ptr()), d, ff, b0, b1);
    }
  });
  return out;
}

// Writes row b's new key and value (qkv[1], qkv[2]: (B, H, 1, D) fp32 holding values of the cache's
// dtype) into the layer's cache at each column columns[b, :] lists (entries < 0: none).
template <typename KV>
void store_columns(const float* qkv, int64_t part_stride, KV* k, KV* v, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const int64_t* cols, int64_t n_cols, int64_t B, int64_t H, int64_t D) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < n_cols; ++c) {
      const int64_t col = cols[b * n_cols + c];
      if (col < 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        const float* kn = qkv + part_stride + (b * H + h) * D;
        const float* vn = qkv + 2 * part_stride + (b * H + h) * D;
        KV* kd = k + b * k_cache.stride(0) + h * k_cache.stride(1) + col * k_cache.stride(2);
        KV* vd = v + b * v_cache.stride(0) + h * v_cache.stride(1) + col * v_cache.stride(2);
        for (int64_t i = 0; i < D; ++i) narrow_to(kn[i], kd + i);
        for (int64_t i = 0; i < D; ++i) narrow_to(vn[i], vd + i);
      }
    }
  }
}

// attend_step: a decode step's whole middle in one call, what split_rotary, the cache's writes,
// attention_f32 and merge_gelu do as four (plus the slicing between them in Python). Right after
// the input projection's GEMV has streamed tens of MB through the caches, every separate dispatch
// runs cold (docs/performance.md); one call pays that once. u (B, 1, N) the input projection's
// output, cos and sin as split_rotary takes them; k_cache and v_cache (B, H, L, D) a layer's keys and
// values (views, the last dimension contiguous), both fp32 or both bf16 (bf16 only for a bf16 u: the
// cache then holds its keys and values exactly); columns int64 (B, C): the columns row b's new key
// and value are written to (entries < 0: none); the attention then reads columns [0, length) under
// mask (as attention_f32's). Returns merge_gelu's (B, 1, d + F) in u's dtype.
at::Tensor attend_step(const at::Tensor& u, const at::Tensor& cos, const at::Tensor& sin, int64_t n_head,
                       int64_t head_dim, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& columns, int64_t length, const at::Tensor& mask) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              "attend_step: k_cache and v_cache must be (B, H, L, D) alike, the last dimension contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat ||
                   (k_cache.scalar_type() == at::kBFloat16 && u.scalar_type() == at::kBFloat16)),
              "attend_step: the caches must be both fp32, or both bf16 for a bf16 u");
  const at::Tensor qkv = split_rotary(u, cos, sin, n_head, head_dim);  // checks u, cos and sin
  const int64_t B = u.size(0), H = n_head, D = head_dim, L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(1) == H && k_cache.size(3) == D, "attend_step: the caches must be (",
              B, ", ", H, ", L, ", D, ")");
  TORCH_CHECK(length >= 1 && length <= L, "attend_step: length must be in [1, ", L, "], got ", length);
  TORCH_CHECK(columns.scalar_type() == at::kLong && columns.dim() == 2 && columns.size(0) == B,
              "attend_step: columns must be int64 (", B, ", C)");
  const at::Tensor cols = columns.contiguous();
  const int64_t* cp = cols.data_ptr<int64_t>();
  for (int64_t i = 0; i < cols.numel(); ++i)
    TORCH_CHECK(cp[i] < L, "attend_step: column ", cp[i], " is past the cache's ", L);
  const int64_t part = B * H * D;
  if (k_cache.scalar_type() == at::kFloat) {
    store_columns(qkv.data_ptr<float>(), part, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), k_cache,
                  v_cache, cp, cols.size(1), B, H, D);
  } else {
    store_columns(qkv.data_ptr<float>(), part, static_cast<uint16_t*>(k_cache.data_ptr()),
                  static_cast<uint16_t*>(v_cache.data_ptr()), k_cache, v_cache, cp, cols.size(1), B, H, D);
  }
  const at::Tensor y = attention_f32(qkv.select(0, 0), k_cache.narrow(2, 0, length), v_cache.narrow(2, 0, length), mask);
  return merge_gelu(y, u);
}

// The sum of n fp32 values (pass mean = 0) or of their squared distances from mean, in vector lanes.
inline float row_sum(const float* p, int64_t n, float mean, bool squares) {
  const vec m = vset1(mean);
  vec a0 = vzero(), a1 = vzero();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    const vec x0 = vsub(vload(p + i), m), x1 = vsub(vload(p + i + kLanes), m);
    a0 = squares ? vfma(x0, x0, a0) : vadd(a0, x0);
    a1 = squares ? vfma(x1, x1, a1) : vadd(a1, x1);
  }
  float total = vsum(vadd(a0, a1));
  for (; i < n; ++i) total += squares ? (p[i] - mean) * (p[i] - mean) : p[i] - mean;
  return total;
}

template <typename T>
void add_layer_norm_rows(const T* x, const T* y, const T* w, const T* b, T* s, T* h, int64_t d,
                         float eps, int64_t r0, int64_t r1) {
  std::vector<float> buf(d);
  float* f = buf.data();
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    const T* yr = y + r * d;
    T* sr = s + r * d;
    T* hr = h + r * d;
    // Simple loops, each one width in and out where it can, so the compiler vectorizes them.
    for (int64_t i = 0; i < d; ++i) f[i] = widen(xr[i]) + widen(yr[i]);
    for (int64_t i = 0; i < d; ++i) narrow_to(f[i], sr + i);
    for (int64_t i = 0; i < d; ++i) f[i] = widen(sr[i]);
    const float mean = row_sum(f, d, 0.0f, false) / static_cast<float>(d);
    const float rstd = 1.0f / std::sqrt(row_sum(f, d, mean, true) / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) f[i] = (f[i] - mean) * rstd * widen(w[i]) + widen(b[i]);
    for (int64_t i = 0; i < d; ++i) narrow_to(f[i], hr + i);
  }
}

// add_layer_norm: a decode step's residual add and the next LayerNorm in one call (the next
// block's, or the final one): s = x + y rounded to x's dtype (ATen's add: the sum in fp32, rounded
// once), h = LayerNorm(s) with fp32 statistics (mean, then the variance about it, as two passes
// over the row), rounded to the dtype once. x (..., d) fp32 or bf16 and y of x's shape and dtype,
// both contiguous; weight and bias (d) of x's dtype. Returns (s, h). Rows as split_rotary's
// (over_rows).
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                                                  const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "add_layer_norm: x must be contiguous fp32 or bf16");
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.is_contiguous(),
              "add_layer_norm: y must be contiguous, of x's shape and dtype");
  TORCH_CHECK(weight.numel() == d && bias.numel() == d && weight.is_contiguous() && bias.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "add_layer_norm: weight and bias must be ", d, " contiguous values of x's dtype");
  at::Tensor s = at::empty_like(x);
  at::Tensor h = at::empty_like(x);
  over_rows(rows, [&](int64_t r0, int64_t r1) {
    if (x.scalar_type() == at::kFloat) {
      add_layer_norm_rows(x.data_ptr<float>(), y.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                          s.data_ptr<float>(), h.data_ptr<float>(), d, static_cast<float>(eps), r0, r1);
    } else {
      auto bits = [](const at::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); };
      add_layer_norm_rows<uint16_t>(bits(x), bits(y), bits(weight), bits(bias), bits(s), bits(h), d,
                                    static_cast<float>(eps), r0, r1);
    }
  });
  return {s, h};
}

// lanes: the fp32 lanes of the vectors this build computes in, 16 (-mavx512f, or its emulation) or 8
// (-mavx2): which branch of this file a library was built from.
int64_t lanes() { return kLanes; }

}  // namespace

TORCH_LIBRARY(PHIBOOK_GEMV_NS, m) {
  m.def("lanes() -> int", &lanes);  // no tensors to dispatch on: one kernel for every backend
  m.def("gemv_f32(Tensor weight, Tensor x, Tensor bias) -> Tensor");
  m.def("gemv_bf16(Tensor weight, Tensor x, Tensor bias) -> Tensor");
  m.def("attention_f32(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("split_rotary(Tensor u, Tensor cos, Tensor sin, int n_head, int head_dim) -> Tensor");
  m.def("merge_gelu(Tensor y, Tensor u) -> Tensor");
  m.def("add_layer_norm(Tensor x, Tensor y, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)");
  m.def("attend_step(Tensor u, Tensor cos, Tensor sin, int n_head, int head_dim, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor columns, int length, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(PHIBOOK_GEMV_NS, CPU, m) {
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("attention_f32", &attention_f32);
  m.impl("split_rotary", &split_rotary);
  m.impl("merge_gelu", &merge_gelu);
  m.impl("attend_step", &attend_step);
  m.impl("add_layer_norm", &add_layer_norm);
}
