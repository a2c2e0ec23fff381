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
//   accumulators, which are scaled into 16 per-row lane sums, added up once per row (the
//   formula above qgemv_rows; weight traffic: a byte per weight);
// - more tokens: each 6-row slab is dequantized into a float slab (per thread, MR x K floats,
//   in L1/L2) and multiplied by the float tiles above (the dequantization is 1/M of the work).
//
// edgeadapt::live_q4linear.out — the same for int4 codes packed two per byte
// (edgeadapt/format/nibbles.py; as XNNPACK's own 4-bit linears read half a byte per weight):
// p (N, K / 32, 16) uint8, each row's codes in blocks of 32 columns, a block's 16 bytes
// holding its columns j (low nibble) and j + 16 (high nibble) offset by 8,
//
//     q[n, 32 b + j] = (p[n, b, j] & 15) - 8      q[n, 32 b + 16 + j] = (p[n, b, j] >> 4) - 8
//
// (j < 16: the code at flat position p = n K + k sits in byte (p >> 5) * 16 + (p & 15), in
// its high nibble iff p & 16, the rule the switch's scatter writes by), scales s (N, K / G)
// with G a multiple of 32, and the same formula as live_qlinear on those codes.
// - one token: per row and block one 16-byte load; the low nibbles are columns k..k+15, the
//   high ones k+16..k+31, each less 8 widened to float and FMA'd into the 16 accumulators in
//   live_qlinear's order (chunk k, then chunk k + 16), then scaled and summed as there, so both
//   forms give the same bits on the same codes (weight traffic: half a byte per weight; on
//   AMD Zen 4 measured no faster than a byte per weight, splitting the nibbles costing what
//   the bytes save: docs/quantized.md);
// - more tokens: each slab is unpacked into the float slab live_qlinear dequantizes to (the
//   same products), then the same tiles.
//
// edgeadapt::live_qlinear_a8.out, edgeadapt::live_q4linear_a8.out — the two code forms with
// int8 activations (x quantized per row in blocks of 32 columns, as edgeadapt's ONNX Runtime
// kernel quantizes them, and multiplied as integers by the codes): below, "int8 activations".
// The exporter writes these where the columns and the groups are whole blocks of 32.
//
// Registered into ExecuTorch's kernel registry (libexecutorch.so of the executorch wheel)
// when this library is loaded: edgeadapt/runtime/backends/executorch/kernel.py builds and
// loads it.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "int8_tiles.h"

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

// The one-token GEMV of both code forms keeps, per row, 16 lane sums over the groups,
//
//     t[j] = sum_g s[n, g] a_g[j]        (in group order, FMA)
//     y[n] = (t[0] + t[1] + ... + t[15]) + r    (lanes: a tree with AVX-512, else in order)
//
// where a_g accumulates (FMA, from zero) the group's codes times x over its 16-column chunks in
// column order (a code per byte: the columns k..k+15 of each chunk; packed: per block of 32
// the low nibbles' chunk k, then the high nibbles' k + 16: the same chunks in the same order),
// and r sums the scaled leftover columns of a group whose width is no multiple of 16 (a code per
// byte only). One horizontal sum per row, not per group: 5x faster at one token than the
// in-order sum per group this kernel had before (docs/quantized.md); the loop is the loads,
// the widenings and the FMAs.
#if defined(__AVX512F__)
using Lanes = __m512;
inline Lanes zero_lanes() { return _mm512_setzero_ps(); }
// t + a * s, lane by lane
inline Lanes scale_add(Lanes t, Lanes a, float s) {
  return _mm512_fmadd_ps(a, _mm512_set1_ps(s), t);
}
// the lanes summed (a tree: halves, then quarters, ...)
inline float sum_lanes(Lanes t) { return _mm512_reduce_add_ps(t); }
// 16 int8 codes widened to float
inline __m512 widen(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }

// a_g of the columns [k, end) of a row of codes q (a code per byte): the whole chunks; returns
// the first column past them
inline int64_t group_lanes(const int8_t* __restrict q, const float* __restrict x, int64_t k,
                           int64_t end, Lanes& a) {
  a = _mm512_setzero_ps();
  for (; k + 16 <= end; k += 16)
    a = _mm512_fmadd_ps(widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))),
                        _mm512_loadu_ps(x + k), a);
  return k;
}

// a_g of `blocks` blocks of packed codes from p (16 bytes each), x at the group's first column:
// per block one 16-byte load, its low and high nibbles split and less 8 in 16-byte registers,
// each half widened to 16 floats as a code per byte is (widening the 16 bytes once and
// splitting the nibbles in int32 lanes measured no faster on AMD Zen 4)
inline void group_lanes4(const uint8_t* __restrict p, const float* __restrict x, int64_t blocks,
                         Lanes& a) {
  const __m128i low = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  a = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, p += 16, x += 32) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(v, low), eight);
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low), eight);
    a = _mm512_fmadd_ps(widen(lo), _mm512_loadu_ps(x), a);
    a = _mm512_fmadd_ps(widen(hi), _mm512_loadu_ps(x + 16), a);
  }
}
#else
struct Lanes {
  float v[16];
};
inline Lanes zero_lanes() { return Lanes{}; }
inline Lanes scale_add(Lanes t, const Lanes& a, float s) {
  for (int j = 0; j < 16; ++j) t.v[j] += a.v[j] * s;
  return t;
}
inline float sum_lanes(const Lanes& t) {
  float sum = 0;
  for (int j = 0; j < 16; ++j) sum += t.v[j];
  return sum;
}

inline int64_t group_lanes(const int8_t* __restrict q, const float* __restrict x, int64_t k,
                           int64_t end, Lanes& a) {
  a = Lanes{};
  for (; k + 16 <= end; k += 16)
    for (int j = 0; j < 16; ++j) a.v[j] += static_cast<float>(q[k + j]) * x[k + j];
  return k;
}

inline void group_lanes4(const uint8_t* __restrict p, const float* __restrict x, int64_t blocks,
                         Lanes& a) {
  a = Lanes{};
  for (int64_t b = 0; b < blocks; ++b, p += 16, x += 32) {
    for (int j = 0; j < 16; ++j) a.v[j] += static_cast<float>((p[j] & 15) - 8) * x[j];
    for (int j = 0; j < 16; ++j) a.v[j] += static_cast<float>((p[j] >> 4) - 8) * x[16 + j];
  }
}
#endif

// y[n] for rows [lo, hi) (the formula above) of codes of type T, `row` codes elements per row
// and `step` per group of G columns: group(c, x, a) sets a = a_g of the group whose codes start
// at c (x at its first column) and returns the sum of its leftover columns' products (0 where
// there are none)
template <class T, class Group>
void qgemv_rows(const T* __restrict codes, int64_t row, int64_t step, const float* __restrict x,
                int64_t G, const float* __restrict s, float* __restrict y, int64_t groups,
                int64_t lo, int64_t hi, Group group) {
  for (int64_t n = lo; n < hi; ++n) {
    const T* c = codes + n * row;
    const float* sn = s + n * groups;
    const float* xg = x;
    Lanes t = zero_lanes(), a;
    float r = 0;
    for (int64_t g = 0; g < groups; ++g, c += step, xg += G) {
      const float left = group(c, xg, a);
      t = scale_add(t, a, sn[g]);
      r += left * sn[g];
    }
    y[n] = sum_lanes(t) + r;
  }
}

// Y (M, N) = X W^T for W = q s (N, K): one token the GEMV gemv(lo, hi) (qgemv_rows), more the
// tiles on slabs whose rows dequant(n, d) writes (d[k] = q[n, k] s[n, k / G], K floats)
template <class Gemv, class Dequant>
void qlinear(const float* X, float* Y, int64_t M, int64_t N, int64_t K, Gemv gemv,
             Dequant dequant) {
  linear(X, Y, M, N, K, gemv, [&](int64_t b) {
    thread_local std::vector<float> slab;
    slab.resize(static_cast<size_t>(MR * K));
    const int64_t rows = std::min<int64_t>(MR, N - b * MR);
    for (int64_t i = 0; i < rows; ++i) dequant(b * MR + i, slab.data() + i * K);
    return static_cast<const float*>(slab.data());
  });
}

// resize out to x's shape with its last dimension N; false where it cannot
bool resize_out(const Tensor& x, int64_t N, Tensor& out) {
  executorch::aten::SizesType sizes[8];
  for (int i = 0; i < x.dim() - 1; ++i) sizes[i] = x.size(i);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(N);
  return executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) ==
         executorch::runtime::Error::Ok;
}

// the code forms' arguments: float x (..., K), int8 codes (N, K) one per byte and float
// scales (N, K / G), or int4 codes packed two per byte (N, K / 32, 16) and scales whose groups
// are whole blocks of 32; float out
bool codes_args(const Tensor& x, const Tensor& codes, const Tensor& scales, const Tensor& out) {
  using executorch::aten::ScalarType;
  return x.dim() >= 1 && x.dim() <= 8 && codes.dim() == 2 && scales.dim() == 2 &&
         x.scalar_type() == ScalarType::Float && codes.scalar_type() == ScalarType::Char &&
         scales.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float &&
         x.size(x.dim() - 1) == codes.size(1) && scales.size(0) == codes.size(0) &&
         scales.size(1) >= 1 && codes.size(1) % scales.size(1) == 0;
}

bool packed_args(const Tensor& x, const Tensor& packed, const Tensor& scales,
                 const Tensor& out) {
  using executorch::aten::ScalarType;
  return x.dim() >= 1 && x.dim() <= 8 && packed.dim() == 3 && packed.size(2) == 16 &&
         scales.dim() == 2 && x.scalar_type() == ScalarType::Float &&
         packed.scalar_type() == ScalarType::Byte && scales.scalar_type() == ScalarType::Float &&
         out.scalar_type() == ScalarType::Float && x.size(x.dim() - 1) == 32 * packed.size(1) &&
         scales.size(0) == packed.size(0) && scales.size(1) >= 1 &&
         packed.size(1) % scales.size(1) == 0;
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
  ET_KERNEL_CHECK(ctx, codes_args(x, codes, scales, out), InvalidArgument, out);
  const int64_t K = codes.size(1), N = codes.size(0), M = K ? x.numel() / K : 0;
  const int64_t groups = scales.size(1), G = K / groups;
  ET_KERNEL_CHECK(ctx, resize_out(x, N, out), InvalidArgument, out);
  const float* X = x.const_data_ptr<float>();
  const int8_t* Q = codes.const_data_ptr<int8_t>();
  const float* S = scales.const_data_ptr<float>();
  float* Y = out.mutable_data_ptr<float>();
  auto group = [G](const int8_t* __restrict q, const float* __restrict x, Lanes& a) {
    float left = 0;
    for (int64_t k = group_lanes(q, x, 0, G, a); k < G; ++k)
      left += static_cast<float>(q[k]) * x[k];
    return left;
  };
  qlinear(X, Y, M, N, K,
          [&](int64_t lo, int64_t hi) { qgemv_rows(Q, K, G, X, G, S, Y, groups, lo, hi, group); },
          [&](int64_t n, float* __restrict d) {
            const int8_t* q = Q + n * K;
            const float* s = S + n * groups;
            for (int64_t g = 0; g < groups; ++g)
              for (int64_t k = g * G; k < (g + 1) * G; ++k)
                d[k] = static_cast<float>(q[k]) * s[g];
          });
  return out;
}

Tensor& live_q4linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed,
                          const Tensor& scales, Tensor& out) {
  ET_KERNEL_CHECK(ctx, packed_args(x, packed, scales, out), InvalidArgument, out);
  const int64_t N = packed.size(0), K = 32 * packed.size(1), M = K ? x.numel() / K : 0;
  const int64_t groups = scales.size(1), blocks = packed.size(1) / groups;  // per group
  ET_KERNEL_CHECK(ctx, resize_out(x, N, out), InvalidArgument, out);
  const float* X = x.const_data_ptr<float>();
  const uint8_t* P = packed.const_data_ptr<uint8_t>();
  const float* S = scales.const_data_ptr<float>();
  const int64_t row = K / 2;  // bytes per row
  float* Y = out.mutable_data_ptr<float>();
  auto group = [blocks](const uint8_t* __restrict p, const float* __restrict x, Lanes& a) {
    group_lanes4(p, x, blocks, a);
    return 0.f;
  };
  qlinear(X, Y, M, N, K,
          [&](int64_t lo, int64_t hi) {
            qgemv_rows(P, row, 16 * blocks, X, 32 * blocks, S, Y, groups, lo, hi, group);
          },
          [&](int64_t n, float* __restrict d) {
            const uint8_t* p = P + n * row;
            const float* s = S + n * groups;
            for (int64_t b = 0; b < K / 32; ++b, p += 16, d += 32) {
              const float sg = s[b / blocks];
              for (int j = 0; j < 16; ++j) {
                d[j] = static_cast<float>((p[j] & 15) - 8) * sg;
                d[16 + j] = static_cast<float>((p[j] >> 4) - 8) * sg;
              }
            }
          });
  return out;
}

// ---- int8 activations: edgeadapt::live_qlinear_a8.out, edgeadapt::live_q4linear_a8.out ----
//
// x quantized per row in blocks of 32 input columns (int8_tiles.h: quantize_row, ONNX Runtime's
// MatMulNBits at accuracy level 4, as edgeadapt's ONNX Runtime kernel quantizes the activations
// of its live codes), codes held as above (int8 one per byte; int4 two per byte), K and G
// multiples of 32:
//
//     y[m, n] = sum_blk (xa[m, blk] s[n, g(blk)]) * sum_{k in blk} xq[m, k] q[n, k]
//
// the inner sums exact in int32, taken on the unsigned codes u = q + O (O = 128 for int8, 8 for
// int4's nibbles as stored) less O sum_{k} xq[m, k] (vpdpbusd's u8 x s8 operands).
// - one token: per 16 rows, 64 bytes of each row at a time transposed as 32-bit words (a lane
//   per row, each word 4 columns), one vpdpbusd per word with the activations' 4 bytes of its
//   columns broadcast, per block the offset term subtracted and (xa s) applied per lane: no
//   horizontal sums, 64 multiply-adds per instruction;
// - more tokens: per strip of 32 rows of w, the codes are gathered into vpdpbusd's order once
//   (the same transpose) and the int8 tiles of int8_tiles.h (4 tokens x 32 outputs, 8 vpdpbusd
//   per 4 input columns) run over the tokens.
// AVX-512BW (int8 codes also VNNI: their u up to 255 overflow vpmaddubsw's int16); plain C++
// on the same integers elsewhere (the float sums ordered otherwise: equal to rounding).

using int8_tiles::AB;
using int8_tiles::IR;
using int8_tiles::quantize_row;

constexpr int64_t STRIP = 32;   // rows of w per gathered panel (int8_tiles::BW)
constexpr int64_t MCHUNK = 128; // tokens per parallel item of the tiles

// the call's activations: every row of x quantized, per block its scale and sum
struct Acts {
  const int8_t* q;
  const float* a;
  const int32_t* sum;
  int64_t nb;
};

Acts quantize_x(const float* X, int64_t M, int64_t K) {
  const int64_t nb = K / AB;
  thread_local std::vector<int8_t> qb;
  thread_local std::vector<float> ab;
  thread_local std::vector<int32_t> sb;
  qb.resize(static_cast<size_t>(M * K));
  ab.resize(static_cast<size_t>(M * nb));
  sb.resize(ab.size());
  int8_t* q = qb.data();  // the calling thread's buffers: the workers get these pointers
  float* a = ab.data();
  int32_t* sum = sb.data();
  auto rows = [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m)
      quantize_row(X + m * K, K, q + m * K, a + m * nb, sum + m * nb, nullptr);
  };
  if (M < 32)
    rows(0, M);  // a decode step: not worth waking the threads
  else
    executorch::extension::parallel_for(0, M, 16, rows);
  return {q, a, sum, nb};
}

// the codes of one weight: int8 one per byte (Packed false: row n at q + n K) or int4 two per
// byte (row n at q + n K / 2, block b's 16 bytes at 16 b: columns j low, j + 16 high, + 8)
template <bool Packed>
struct Codes {
  const uint8_t* q;
  const float* s;
  int64_t N, K, groups, G;
  static constexpr int32_t O = Packed ? 8 : 128;  // u = q + O
  const uint8_t* row(int64_t n) const { return q + n * (Packed ? K / 2 : K); }
  int32_t code(int64_t n, int64_t k) const {
    const uint8_t* r = row(n);
    if constexpr (Packed) {
      const uint8_t b = r[(k / 32) * 16 + (k & 15)];
      return ((k & 16) ? (b >> 4) : (b & 15)) - 8;
    } else {
      return static_cast<int8_t>(r[k]);
    }
  }
};

// plain C++: rows [lo, hi) of token m's y, block by block in order
template <bool Packed>
void a8_rows_portable(const Codes<Packed>& w, const Acts& x, int64_t m, float* y, int64_t lo,
                      int64_t hi) {
  const int8_t* xq = x.q + m * w.K;
  const float* xa = x.a + m * x.nb;
  for (int64_t n = lo; n < hi; ++n) {
    const float* sn = w.s + n * w.groups;
    float acc = 0.f;
    for (int64_t blk = 0; blk < x.nb; ++blk) {
      int32_t d = 0;
      for (int64_t k = blk * AB; k < (blk + 1) * AB; ++k) d += w.code(n, k) * xq[k];
      acc = std::fma(static_cast<float>(d), xa[blk] * sn[blk * AB / w.G], acc);
    }
    y[n] = acc;
  }
}

#if defined(__AVX512BW__)
template <bool Packed>
#if defined(__AVX512VNNI__)
constexpr bool a8_vector = true;
#else
constexpr bool a8_vector = Packed;  // int4's u <= 15 fit vpmaddubsw's pairs
#endif

// r[i] (16 rows of 16 32-bit words) -> r[t] the words t of the 16 rows
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // b[4 g + i]: in 128-bit lane L, rows 4 g .. 4 g + 3 at word 4 L + i
  for (int g = 0; g < 4; ++g) {
    b[4 * g + 0] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  // word 4 L + i: lane L of b[i], b[4 + i], b[8 + i], b[12 + i]
  for (int i = 0; i < 4; ++i) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[i], b[4 + i], 0x44);
    const __m512i c1 = _mm512_shuffle_i32x4(b[i], b[4 + i], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + i], b[12 + i], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + i], b[12 + i], 0xEE);
    r[i] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[4 + i] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    r[8 + i] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// Rows [n0, n0 + 16) of w (past N: code 0), bytes [c, c + valid) of each (valid <= 64; past it:
// code 0), transposed (transpose16): r[t] holds, one row per lane, the row's 32-bit word t of the
// chunk (int8: columns c + 4 t .. + 3; int4: of block c / 16 + t / 4, the low nibbles its columns
// 4 (t % 4) .. + 3 and the high ones 16 columns on)
template <bool Packed>
inline void transposed_words(const Codes<Packed>& w, int64_t n0, int64_t c, int64_t valid,
                             __m512i r[16]) {
  const __m512i fill = _mm512_set1_epi8(static_cast<char>(Packed ? 0x88 : 0x00));
  const __mmask64 mask = valid == 64 ? ~0ull : (1ull << valid) - 1;
  for (int i = 0; i < 16; ++i)
    r[i] = n0 + i < w.N ? _mm512_mask_loadu_epi8(fill, mask, w.row(n0 + i) + c) : fill;
  transpose16(r);
}

// rows [n0, n0 + 32) of w (past N: code 0) gathered into vpdpbusd's order: per 4 input columns
// c..c+3, 128 bytes at (c / 4) 128, rows n0..n0+15 then n0+16..n0+31, a lane each holding
// u[n, c..c+3]; and their scales as (groups, 32)
template <bool Packed>
void gather_strip(const Codes<Packed>& w, int64_t n0, uint8_t* panel, float* sbuf) {
  const int64_t bytes = Packed ? w.K / 2 : w.K;  // per row
  for (int64_t c = 0; c < bytes; c += 64) {
    const int64_t valid = std::min<int64_t>(64, bytes - c);
    for (int h = 0; h < 2; ++h) {
      __m512i r[16];
      transposed_words<Packed>(w, n0 + 16 * h, c, valid, r);
      for (int t = 0; t < valid / 4; ++t) {
        if constexpr (Packed) {
          // word t: block c / 16 + t / 4, its bytes 4 (t % 4) .. + 3: columns 4 (t % 4) + 0..3
          // (low nibbles) and 16 + 4 (t % 4) + 0..3 (high)
          const int64_t e = 8 * (c / 16 + t / 4) + t % 4;  // the low nibbles' 4 columns / 4
          const __m512i nib = _mm512_set1_epi8(15);
          _mm512_storeu_si512(panel + e * 128 + 64 * h, _mm512_and_si512(r[t], nib));
          _mm512_storeu_si512(panel + (e + 4) * 128 + 64 * h,
                              _mm512_and_si512(_mm512_srli_epi16(r[t], 4), nib));
        } else {
          _mm512_storeu_si512(panel + (c / 4 + t) * 128 + 64 * h,
                              _mm512_xor_si512(r[t], _mm512_set1_epi8(static_cast<char>(0x80))));
        }
      }
    }
  }
  for (int64_t g = 0; g < w.groups; ++g)
    for (int64_t j = 0; j < STRIP; ++j)
      sbuf[g * STRIP + j] = n0 + j < w.N ? w.s[(n0 + j) * w.groups + g] : 0.f;
}

// One token, rows [n0, n0 + 16) of w (past N: code 0, not stored): the rows' codes 64 bytes at a
// time as transposed_words; one vpdpbusd per word with the activations' 4 bytes of its columns
// broadcast, and per block the offset term subtracted and (xa s) applied per lane
template <bool Packed>
void a8_gemv16(const Codes<Packed>& w, const Acts& x, float* y, int64_t n0) {
  const int64_t bytes = Packed ? w.K / 2 : w.K;  // per row
  const int64_t rows = std::min<int64_t>(16, w.N - n0);
  const __mmask16 live = static_cast<__mmask16>(rows == 16 ? 0xffff : (1u << rows) - 1);
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(w.groups)));  // the rows' scales, a row apart
  const float* s0 = w.s + n0 * w.groups;
  __m512 acc = _mm512_setzero_ps();
  auto block = [&](int64_t b, __m512i dot) {  // block b's term into acc
    const __m512 s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, lanes,
                                              s0 + b * AB / w.G, 4);
    const __m512i d = _mm512_sub_epi32(dot, _mm512_set1_epi32(Codes<Packed>::O * x.sum[b]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(x.a[b])), acc);
  };
  for (int64_t c = 0; c < bytes; c += 64) {
    const int64_t valid = std::min<int64_t>(64, bytes - c);
    __m512i r[16];
    transposed_words<Packed>(w, n0, c, valid, r);
    if constexpr (Packed) {
      const __m512i nib = _mm512_set1_epi8(15);
      for (int64_t bl = 0; bl < valid / 16; ++bl) {  // 16 bytes a block
        const int64_t b = c / 16 + bl;
        const int8_t* xb = x.q + b * AB;
        __m512i d = _mm512_setzero_si512();
        for (int t = 0; t < 4; ++t) {
          const __m512i v = r[4 * bl + t];
          d = int8_tiles::dot4(d, _mm512_and_si512(v, nib),
                               _mm512_set1_epi32(int8_tiles::four_bytes(xb + 4 * t)));
          d = int8_tiles::dot4(d, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib),
                               _mm512_set1_epi32(int8_tiles::four_bytes(xb + 16 + 4 * t)));
        }
        block(b, d);
      }
    } else {
      const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
      for (int64_t bl = 0; bl < valid / 32; ++bl) {  // 32 bytes a block
        const int64_t b = c / 32 + bl;
        const int8_t* xb = x.q + b * AB;
        __m512i d = _mm512_setzero_si512();
        for (int t = 0; t < 8; ++t)
          d = int8_tiles::dot4(d, _mm512_xor_si512(r[8 * bl + t], sign),
                               _mm512_set1_epi32(int8_tiles::four_bytes(xb + 4 * t)));
        block(b, d);
      }
    }
  }
  _mm512_mask_storeu_ps(y + n0, live, acc);
}
#endif

// Y (M, N) = A(X) W^T for the codes w
template <bool Packed>
void a8_linear(const float* X, float* Y, int64_t M, const Codes<Packed>& w) {
  const int64_t N = w.N, K = w.K;
  if (M == 0 || N == 0) return;
  const Acts x = quantize_x(X, M, K);
#if defined(__AVX512BW__)
  if constexpr (a8_vector<Packed>) {
    if (M == 1) {
      executorch::extension::parallel_for(0, (N + 15) / 16, 2, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) a8_gemv16<Packed>(w, x, Y, 16 * b);
      });
      return;
    }
    const int64_t strips = (N + STRIP - 1) / STRIP, chunks = (M + MCHUNK - 1) / MCHUNK;
    executorch::extension::parallel_for(0, strips * chunks, 1, [&](int64_t lo, int64_t hi) {
      thread_local std::vector<uint8_t> panel;
      thread_local std::vector<float> sbuf, ytmp;
      panel.resize(static_cast<size_t>(K / 4 * 128));
      sbuf.resize(static_cast<size_t>(w.groups * STRIP));
      ytmp.resize(static_cast<size_t>(IR * STRIP));
      int64_t built = -1;
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t strip = item / chunks, n0 = strip * STRIP;
        const int64_t m0 = (item % chunks) * MCHUNK, m1 = std::min<int64_t>(M, m0 + MCHUNK);
        if (strip != built) {
          gather_strip<Packed>(w, n0, panel.data(), sbuf.data());
          built = strip;
        }
        const bool full = n0 + STRIP <= N;
        for (int64_t m = m0; m < m1; m += IR) {
          const int rows = static_cast<int>(std::min<int64_t>(IR, m1 - m));
          float* y = full ? Y + m * N + n0 : ytmp.data();
          int8_tiles::itile_rows<Codes<Packed>::O>(
              rows, x.q + m * K, x.nb, x.a + m * x.nb, x.sum + m * x.nb, panel.data(),
              sbuf.data(), y, full ? N : STRIP, K, w.G, std::make_integer_sequence<int, IR>{});
          if (!full)
            for (int r = 0; r < rows; ++r)
              for (int64_t j = 0; j < N - n0; ++j) Y[(m + r) * N + n0 + j] = ytmp[r * STRIP + j];
        }
      }
    });
    return;
  }
#endif
  executorch::extension::parallel_for(0, N, 32, [&](int64_t lo, int64_t hi) {
    for (int64_t m = 0; m < M; ++m) a8_rows_portable<Packed>(w, x, m, Y + m * N, lo, hi);
  });
}

Tensor& live_qlinear_a8_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes,
                            const Tensor& scales, Tensor& out) {
  ET_KERNEL_CHECK(ctx, codes_args(x, codes, scales, out) && codes.size(1) % AB == 0 &&
                  (codes.size(1) / scales.size(1)) % AB == 0, InvalidArgument, out);
  const int64_t K = codes.size(1), N = codes.size(0), M = K ? x.numel() / K : 0;
  ET_KERNEL_CHECK(ctx, resize_out(x, N, out), InvalidArgument, out);
  const Codes<false> w{reinterpret_cast<const uint8_t*>(codes.const_data_ptr<int8_t>()),
                       scales.const_data_ptr<float>(), N, K, scales.size(1),
                       K / scales.size(1)};
  a8_linear<false>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), M, w);
  return out;
}

Tensor& live_q4linear_a8_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed,
                             const Tensor& scales, Tensor& out) {
  ET_KERNEL_CHECK(ctx, packed_args(x, packed, scales, out), InvalidArgument, out);
  const int64_t N = packed.size(0), K = 32 * packed.size(1), M = K ? x.numel() / K : 0;
  ET_KERNEL_CHECK(ctx, resize_out(x, N, out), InvalidArgument, out);
  const Codes<true> w{packed.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), N, K,
                      scales.size(1), K / scales.size(1)};
  a8_linear<true>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), M, w);
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(edgeadapt, "live_linear.out", live_linear_out);
EXECUTORCH_LIBRARY(edgeadapt, "live_qlinear.out", live_qlinear_out);
EXECUTORCH_LIBRARY(edgeadapt, "live_q4linear.out", live_q4linear_out);
EXECUTORCH_LIBRARY(edgeadapt, "live_qlinear_a8.out", live_qlinear_a8_out);
EXECUTORCH_LIBRARY(edgeadapt, "live_q4linear_a8.out", live_q4linear_a8_out);
