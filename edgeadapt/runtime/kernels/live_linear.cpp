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
// Registered into ExecuTorch's kernel registry (libexecutorch.so of the executorch wheel)
// when this library is loaded: edgeadapt/runtime/executorch_kernel.py builds and loads it.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
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

Tensor& live_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& w,
                        Tensor& out) {
  ET_KERNEL_CHECK(ctx, x.dim() >= 1 && x.dim() <= 8 && w.dim() == 2 &&
                  x.scalar_type() == executorch::aten::ScalarType::Float &&
                  w.scalar_type() == executorch::aten::ScalarType::Float &&
                  out.scalar_type() == executorch::aten::ScalarType::Float &&
                  x.size(x.dim() - 1) == w.size(1), InvalidArgument, out);
  const int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0;
  executorch::aten::SizesType sizes[8];
  for (int i = 0; i < x.dim() - 1; ++i) sizes[i] = x.size(i);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(N);
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(
                           out, {sizes, static_cast<size_t>(x.dim())}) ==
                           executorch::runtime::Error::Ok, InvalidArgument, out);
  const float* X = x.const_data_ptr<float>();
  const float* W = w.const_data_ptr<float>();
  float* Y = out.mutable_data_ptr<float>();
  if (M == 0 || N == 0) return out;
  if (M == 1) {
    executorch::extension::parallel_for(0, N, 32, [&](int64_t lo, int64_t hi) {
      gemv_rows(X, W, Y, K, lo, hi);
    });
    return out;
  }
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
  const int64_t tiles = (N + MR - 1) / MR;
  executorch::extension::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t g = 0; g < panels; g += PG)  // PG panels (590 KB) stay in L2 across slabs
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t p = g; p < std::min<int64_t>(panels, g + PG); ++p) {
        const int64_t mt = std::min<int64_t>(NT, M - p * NT);
        const float* xp = xt + p * K * NT;
        float* y = Y + p * NT * N;
        const int rows = static_cast<int>(std::min<int64_t>(MR, N - b * MR));
#if defined(__AVX512F__)
        if (rows == MR) {
          tile_avx512(W, xp, y, K, b * MR, N, mt);
          continue;
        }
#endif
        tile(W, xp, y, K, b * MR, rows, N, mt);
      }
  });
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(edgeadapt, "live_linear.out", live_linear_out);
