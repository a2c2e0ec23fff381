// edgeadapt::live_linear.out — an ExecuTorch kernel for a linear whose weight is a live
// (mutable, edited in place) buffer:
//
//     out[m, n] = sum_k x[m, k] * w[n, k]          x (..., K), w (N, K) row-major, out (..., N)
//
// Why: XNNPACK packs a GEMM's right operand on every call unless it is a constant, and with
// the weight on the left it pads the token count to its tile width, so at one token every
// XNNPACK form of a live linear costs 1.9-2x a packed constant (docs/bench.md). This kernel
// reads w in place, in the layout the runtime edits (torch's (out, in)):
//
// - one token (M == 1): a GEMV, each row of w a contiguous dot product;
// - more tokens: x^T is packed once per call into 64-token panels xt[p][k][t] (zero padded),
//   then 6-row slabs of w (in L1) are multiplied with every panel of a group of four (in L2):
//   6 x 64 accumulators, one broadcast of w[n, k] per row and four 16-float loads of the panel
//   per k (AVX-512; plain C++ elsewhere). Slabs are split across ExecuTorch's threadpool.
//
// edgeadapt::live_qlinear.out — the same for a quantized live weight (edgeadapt/format/quant.py):
// int8 codes q (N, K) row-major, one code per byte (int4 codes too), and float scales
// s (N, K / G), G input columns per scale (the grids: G = 32):
//
//     out[m, n] = sum_g s[n, g] * sum_{k in group g} x[m, k] * q[n, k]
//
// - one token: per row and group, the codes are widened to float and multiplied with 16
//   accumulators, then scaled once per group (weight traffic: a byte per weight);
// - more tokens: each 6-row slab is dequantized into a float slab (per thread, MR x K floats,
//   in L1/L2) and multiplied by the float tiles above (the dequantization is 1/M of the work).
//
// Registered into ExecuTorch's kernel registry (libexecutorch.so of the executorch wheel)
// when this library is loaded: edgeadapt/runtime/executorch_kernel.py builds and loads it.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

constexpr int MR = 6;   // rows of w per tile
constexpr int NT = 64;  // tokens per panel
constexpr int PG = 4;   // panels per group: 4 * 64 tokens * K floats (590 KB at K = 576)

// y[n] = sum_k w[n, k] x[k] for rows [lo, hi)
void gemv_rows(const float* __restrict x, const float* __restrict w, float* __restrict y,
               int64_t K, int64_t lo, int64_t hi) {
  for (int64_t n = lo; n < hi; ++n) {
    const float* __restrict r = w + n * K;
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      for (int j = 0; j < 16; ++j) acc[j] += r[k + j] * x[k + j];
    float s = 0;
    for (int j = 0; j < 16; ++j) s += acc[j];
    for (; k < K; ++k) s += r[k] * x[k];
    y[n] = s;
  }
}

// y[t, n0 + i] = sum_k w[n0 + i, k] xt[k, t] for i < rows, t < mt (one panel, y row stride ldy)
void tile(const float* __restrict w, const float* __restrict xt, float* __restrict y, int64_t K,
          int64_t n0, int rows, int64_t ldy, int64_t mt) {
  float acc[MR][NT];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict xr = xt + k * NT;
    for (int i = 0; i < rows; ++i) {
      const float a = w[(n0 + i) * K + k];
      for (int t = 0; t < NT; ++t) acc[i][t] += a * xr[t];
    }
  }
  for (int64_t t = 0; t < mt; ++t)
    for (int i = 0; i < rows; ++i) y[t * ldy + n0 + i] = acc[i][t];
}

#if defined(__AVX512F__)
// tile() for a full slab of MR rows, the accumulators in registers (24 of the 32)
void tile_avx512(const float* __restrict w, const float* __restrict xt, float* __restrict y,
                 int64_t K, int64_t n0, int64_t ldy, int64_t mt) {
  __m512 c[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) c[i][j] = _mm512_setzero_ps();
  const float* r = w + n0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const float* xr = xt + k * NT;
    const __m512 b0 = _mm512_loadu_ps(xr), b1 = _mm512_loadu_ps(xr + 16),
                 b2 = _mm512_loadu_ps(xr + 32), b3 = _mm512_loadu_ps(xr + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(r[i * K + k]);
      c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
      c[i][2] = _mm512_fmadd_ps(a, b2, c[i][2]);
      c[i][3] = _mm512_fmadd_ps(a, b3, c[i][3]);
    }
  }
  alignas(64) float tmp[MR][NT];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) _mm512_store_ps(&tmp[i][16 * j], c[i][j]);
  for (int64_t t = 0; t < mt; ++t)
    for (int i = 0; i < MR; ++i) y[t * ldy + n0 + i] = tmp[i][t];
}
#endif

// x^T packed into 64-token panels xt[p][k][t] (zero padded); per-thread storage, returned
float* pack_panels(const float* X, int64_t M, int64_t K) {
  const int64_t panels = (M + NT - 1) / NT, kblocks = (K + 15) / 16;
  thread_local std::vector<float> xt_buf;
  xt_buf.resize(static_cast<size_t>(panels * K * NT));
  float* xt = xt_buf.data();  // thread_local is per thread: the workers get this pointer
  executorch::extension::parallel_for(0, panels * kblocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t p = q / kblocks, k0 = (q % kblocks) * 16, k1 = std::min<int64_t>(K, k0 + 16);
      const int64_t mt = std::min<int64_t>(NT, M - p * NT);
      float* dst = xt + p * K * NT;
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t t = 0; t < mt; ++t) dst[k * NT + t] = X[(p * NT + t) * K + k];
        for (int64_t t = mt; t < NT; ++t) dst[k * NT + t] = 0.f;
      }
    }
  });
  return xt;
}

// Y (M, N) = X W^T for M > 1, W given slab by slab: slab(b) is a float pointer to rows
// [b MR, b MR + rows) of W (row-major, K columns), valid until the next call on this thread.
template <class Slab>
void tiled(const float* X, float* Y, int64_t M, int64_t N, int64_t K, Slab slab) {
  const int64_t panels = (M + NT - 1) / NT;
  const float* xt = pack_panels(X, M, K);
  const int64_t tiles = (N + MR - 1) / MR;
  executorch::extension::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t g = 0; g < panels; g += PG)  // PG panels (590 KB) stay in L2 across slabs
    for (int64_t b = lo; b < hi; ++b) {
      const float* w = slab(b);
      const int rows = static_cast<int>(std::min<int64_t>(MR, N - b * MR));
      for (int64_t p = g; p < std::min<int64_t>(panels, g + PG); ++p) {
        const int64_t mt = std::min<int64_t>(NT, M - p * NT);
        const float* xp = xt + p * K * NT;
        float* y = Y + p * NT * N + b * MR;
#if defined(__AVX512F__)
        if (rows == MR) {
          tile_avx512(w, xp, y, K, 0, N, mt);
          continue;
        }
#endif
        tile(w, xp, y, K, 0, rows, N, mt);
      }
    }
  });
}

// Y (M, N) = X W^T: gemv(lo, hi) computes rows [lo, hi) of a single token's y; slab(b) as
// in tiled()
template <class Gemv, class Slab>
void linear(const float* X, float* Y, int64_t M, int64_t N, int64_t K, Gemv gemv, Slab slab) {
  if (M == 0 || N == 0) return;
  if (M == 1) {
    executorch::extension::parallel_for(0, N, 32, gemv);
    return;
  }
  tiled(X, Y, M, N, K, slab);
}

// y[n] = sum_g s[n, g] sum_{k in g} q[n, k] x[k] for rows [lo, hi); G columns per scale
void qgemv_rows(const float* __restrict x, const int8_t* __restrict q,
                const float* __restrict s, float* __restrict y, int64_t K, int64_t G,
                int64_t lo, int64_t hi) {
  const int64_t groups = K / G;
  for (int64_t n = lo; n < hi; ++n) {
    const int8_t* __restrict r = q + n * K;
    float total = 0;
    for (int64_t g = 0; g < groups; ++g) {
      float acc[16] = {0};
      int64_t k = g * G;
      const int64_t end = k + G;
      for (; k + 16 <= end; k += 16)
        for (int j = 0; j < 16; ++j) acc[j] += static_cast<float>(r[k + j]) * x[k + j];
      float part = 0;
      for (int j = 0; j < 16; ++j) part += acc[j];
      for (; k < end; ++k) part += static_cast<float>(r[k]) * x[k];
      total += part * s[n * groups + g];
    }
    y[n] = total;
  }
}

// resize out to x's shape with its last dimension N; false where it cannot
bool resize_out(const Tensor& x, int64_t N, Tensor& out) {
  executorch::aten::SizesType sizes[8];
  for (int i = 0; i < x.dim() - 1; ++i) sizes[i] = x.size(i);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(N);
  return executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) ==
         executorch::runtime::Error::Ok;
}

Tensor& live_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& w,
                        Tensor& out) {
  ET_KERNEL_CHECK(ctx, x.dim() >= 1 && x.dim() <= 8 && w.dim() == 2 &&
                  x.scalar_type() == executorch::aten::ScalarType::Float &&
                  w.scalar_type() == executorch::aten::ScalarType::Float &&
                  out.scalar_type() == executorch::aten::ScalarType::Float &&
                  x.size(x.dim() - 1) == w.size(1), InvalidArgument, out);
  const int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0;
  ET_KERNEL_CHECK(ctx, resize_out(x, N, out), InvalidArgument, out);
  const float* X = x.const_data_ptr<float>();
  const float* W = w.const_data_ptr<float>();
  float* Y = out.mutable_data_ptr<float>();
  linear(X, Y, M, N, K, [&](int64_t lo, int64_t hi) { gemv_rows(X, W, Y, K, lo, hi); },
         [&](int64_t b) { return W + b * MR * K; });
  return out;
}

Tensor& live_qlinear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes,
                         const Tensor& scales, Tensor& out) {
  using executorch::aten::ScalarType;
  ET_KERNEL_CHECK(ctx, x.dim() >= 1 && x.dim() <= 8 && codes.dim() == 2 &&
                  scales.dim() == 2 && x.scalar_type() == ScalarType::Float &&
                  codes.scalar_type() == ScalarType::Char &&
                  scales.scalar_type() == ScalarType::Float &&
                  out.scalar_type() == ScalarType::Float &&
                  x.size(x.dim() - 1) == codes.size(1) && scales.size(0) == codes.size(0) &&
                  scales.size(1) >= 1 && codes.size(1) % scales.size(1) == 0,
                  InvalidArgument, out);
  const int64_t K = codes.size(1), N = codes.size(0), M = K ? x.numel() / K : 0;
  const int64_t G = K / scales.size(1);
  ET_KERNEL_CHECK(ctx, resize_out(x, N, out), InvalidArgument, out);
  const float* X = x.const_data_ptr<float>();
  const int8_t* Q = codes.const_data_ptr<int8_t>();
  const float* S = scales.const_data_ptr<float>();
  float* Y = out.mutable_data_ptr<float>();
  auto gemv = [&](int64_t lo, int64_t hi) { qgemv_rows(X, Q, S, Y, K, G, lo, hi); };
  linear(X, Y, M, N, K, gemv, [&](int64_t b) {
    thread_local std::vector<float> slab;
    slab.resize(static_cast<size_t>(MR * K));
    const int64_t rows = std::min<int64_t>(MR, N - b * MR), groups = K / G;
    for (int64_t i = 0; i < rows; ++i) {
      const int8_t* q = Q + (b * MR + i) * K;
      const float* s = S + (b * MR + i) * groups;
      float* d = slab.data() + i * K;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t k = g * G; k < (g + 1) * G; ++k) d[k] = static_cast<float>(q[k]) * s[g];
    }
    return static_cast<const float*>(slab.data());
  });
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(edgeadapt, "live_linear.out", live_linear_out);
EXECUTORCH_LIBRARY(edgeadapt, "live_qlinear.out", live_qlinear_out);
