// The int8 activations of edgeadapt's kernels and the integer tiles that multiply them by
// codes (kernels/blocked_matmul.cpp, ONNX Runtime; kernels/live_linear.cpp, ExecuTorch): one home
// for the quantizer both backends' live linears apply, so that they compute the same numbers.
//
// quantize_row: one row of x in blocks of AB = 32 input columns, symmetric int8, exactly as
// ONNX Runtime's MatMulNBits at accuracy level 4 quantizes its activations (MLAS's
// QuantizeARow_CompInt8, the AVX-512 form; the last block of a row short where 32 does not
// divide K):
//
//     m = max_{c in blk} |x[c]|,   a_blk = m / 127,   xq[c] = rint(x[c] * (127 / m))
//
// (127 / m a float of its own; rint: to nearest, ties to even; m = 0: a_blk = 0, xq = 0).
//
// itile: R rows of those activations times one panel of 32 output columns' codes gathered into
// vpdpbusd's order (per 4 input columns c..c+3, 128 bytes: output columns 0..15 then 16..31,
// each a 32-bit lane of 4 unsigned codes n = q + O, input column c + t in byte t) and their
// scales s (K/G, 32):
//
//     y[r, j] = sum_blk (xa[r, blk] s[g(blk), j]) * (sum_{c in blk} xq[r, c] n[c, j] - O xsum[r, blk])
//
// the inner sums exact in int32 (vpdpbusd, or vpmaddubsw + vpmaddwd without VNNI: exact for
// n <= 15 only), each block's term one float FMA per output, blocks in order.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace int8_tiles {

constexpr int64_t AB = 32;  // input columns per block of int8 activations
constexpr int64_t BW = 32;  // output columns per panel

// One row of x (K columns) at level 4: its int8 activations q (K rounded up to whole blocks,
// zeros past K, as MLAS pads), per block of AB columns the scale a and the sum of q, and the
// dequantized row xd[c] = q[c] * a_blk (the float paths' x; not written where xd is null)
inline void quantize_row(const float* __restrict x, int64_t K, int8_t* __restrict q,
                         float* __restrict a, int32_t* __restrict sum, float* __restrict xd) {
  for (int64_t c0 = 0, blk = 0; c0 < K; c0 += AB, ++blk) {
    const int64_t n = std::min(AB, K - c0);
#if defined(__AVX512F__)
    // MLAS's own steps: masked loads, max of |x|, x * (127 / m) rounded to nearest even
    const uint32_t in_x = n == AB ? 0xffffffffu : (1u << n) - 1;  // the block's columns in x
    const __mmask16 m0 = static_cast<__mmask16>(in_x), m1 = static_cast<__mmask16>(in_x >> 16);
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + c0);
    const __m512 v1 = _mm512_maskz_loadu_ps(m1, x + c0 + 16);
    const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float scale = m / 127.f;
    const __m512 inv = _mm512_set1_ps(m != 0.f ? 127.f / m : 0.f);
    const __m512 r0 = _mm512_roundscale_ps(_mm512_mul_ps(v0, inv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r1 = _mm512_roundscale_ps(_mm512_mul_ps(v1, inv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i i0 = _mm512_cvtps_epi32(r0), i1 = _mm512_cvtps_epi32(r1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c0), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c0 + 16), _mm512_cvtepi32_epi8(i1));
    sum[blk] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    const __m512 s = _mm512_set1_ps(scale);
    if (xd) {
      _mm512_mask_storeu_ps(xd + c0, m0, _mm512_mul_ps(r0, s));
      _mm512_mask_storeu_ps(xd + c0 + 16, m1, _mm512_mul_ps(r1, s));
    }
    a[blk] = scale;
#else
    float m = 0.f;
    for (int64_t c = 0; c < n; ++c) m = std::max(m, std::fabs(x[c0 + c]));
    const float scale = m / 127.f, inv = m != 0.f ? 127.f / m : 0.f;
    int32_t total = 0;
    for (int64_t c = 0; c < AB; ++c) {
      const int32_t v = c < n ? static_cast<int32_t>(std::nearbyint(x[c0 + c] * inv)) : 0;
      q[c0 + c] = static_cast<int8_t>(v);
      total += v;
      if (xd && c < n) xd[c0 + c] = static_cast<float>(v) * scale;
    }
    sum[blk] = total;
    a[blk] = scale;
#endif
  }
}

#if defined(__AVX512BW__)
// the 4 int8 activations at x as one 32-bit lane (vpdpbusd's s8 operand, broadcast)
inline int32_t four_bytes(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

// acc + the sums of 4 u8 x s8 products per 32-bit lane: vpdpbusd, or without VNNI vpmaddubsw
// (pairs into int16: exact for u <= 15, int4's codes) and vpmaddwd by 1 (pairs into int32)
inline __m512i dot4(__m512i acc, __m512i u, __m512i x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, x);
#else
  return _mm512_add_epi32(
      acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1)));
#endif
}

#endif

// rows per int8 tile (itile): 2 IR int32 and 2 IR float accumulators
constexpr int IR = 4;

#if defined(__AVX512BW__)
template <int32_t O, int R>
void itile(const int8_t* __restrict xq, int64_t nb, const float* __restrict xa,
           const int32_t* __restrict xsum, const uint8_t* __restrict panel,
           const float* __restrict s, float* __restrict y, int64_t ldy, int64_t K, int64_t G) {
  const int64_t stride = nb * AB;
  __m512 ya[R], yb[R];
  for (int r = 0; r < R; ++r) ya[r] = yb[r] = _mm512_setzero_ps();
  for (int64_t c0 = 0, blk = 0; c0 < K; c0 += AB, ++blk) {
    __m512i a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_si512();
    for (int64_t c = c0; c < c0 + AB; c += 4) {
      const uint8_t* pq = panel + (c / 4) * 128;
      const __m512i lo = _mm512_loadu_si512(pq), hi = _mm512_loadu_si512(pq + 64);
      for (int r = 0; r < R; ++r) {
        const __m512i xr = _mm512_set1_epi32(four_bytes(xq + r * stride + c));
        a[r] = dot4(a[r], lo, xr);
        b[r] = dot4(b[r], hi, xr);
      }
    }
    const float* sg = s + (c0 / G) * BW;
    const __m512 slo = _mm512_loadu_ps(sg), shi = _mm512_loadu_ps(sg + 16);
    for (int r = 0; r < R; ++r) {
      const __m512i off = _mm512_set1_epi32(O * xsum[r * nb + blk]);
      const __m512 xs = _mm512_set1_ps(xa[r * nb + blk]);
      ya[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[r], off)),
                              _mm512_mul_ps(xs, slo), ya[r]);
      yb[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(b[r], off)),
                              _mm512_mul_ps(xs, shi), yb[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * ldy, ya[r]);
    _mm512_storeu_ps(y + r * ldy + 16, yb[r]);
  }
}

template <int32_t O, int... Rs>
void itile_rows(int rows, const int8_t* xq, int64_t nb, const float* xa, const int32_t* xsum,
                const uint8_t* panel, const float* s, float* y, int64_t ldy, int64_t K,
                int64_t G, std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? (itile<O, Rs + 1>(xq, nb, xa, xsum, panel, s, y, ldy, K, G), 0) : 0), ...);
}
#endif

}  // namespace int8_tiles
