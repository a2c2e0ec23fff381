// edgeadapt.BlockedMatMul — an ONNX Runtime custom op for a linear whose weight is a live
// (graph input, edited in place) buffer in the blocked32 layout (edgeadapt/format/layout.py):
//
//     y[m, 32 b + j] = sum_c x[m, c] * w[b, c, j]     x (..., K), w (N/32, K, 32), y (..., N)
//
// It takes one x and any number of weights, y_i = x w_i (outputs in the weights' order, each
// its own N_i): the projections that read one x (a layer's q, k and v) are one node and one
// parallel section, where three would each pay ONNX Runtime's per-node cost and wake the
// threads (edgeadapt/graphs/blocked.py merges them; a weight may also be a constant in the
// layout).
//
// Why: every MLAS GEMM whose B operand is not a constant copies each B panel before it
// multiplies (docs/bench.md), so a live weight read by MatMul costs about 1.19x a packed
// constant at 64 tokens. blocked32 already is a packed-B layout (each 32-column block a
// contiguous K x 32 run), so this kernel reads it in place and packs nothing:
//
// - one token (M == 1): per block, stream w[b] with eight accumulators (FMA latency), sum,
//   the hardware prefetcher alone reading ahead (software prefetches 32 rows ahead, tried,
//   slowed a decode step's q/k/v node on Zen 4: docs/generate.md, "Decode speed on ONNX
//   Runtime");
// - more tokens: 12-row x 32-column tiles, 24 accumulators: per c, two 16-float loads of
//   w[b, c, :] and one broadcast of x[m, c] per row (AVX-512; plain C++ elsewhere). Rows are
//   taken in chunks of MC (the chunk of x stays in L2 while every block passes over it); the
//   (chunk, block) pairs are split over ONNX Runtime's intra-op threadpool.
//
// edgeadapt.QBlockedMatMul — the same for a quantized live weight (edgeadapt/format/quant.py):
// int8 codes q (N/32, K, 32) in the blocked32 layout, one code per byte, and float scales
// s (N/32, K/G, 32), G input columns per scale (the grids: G = 32; G = K: one per row):
//
//     y[m, 32 b + j] = sum_g s[b, g, j] * sum_{c in group g} x[m, c] * q[b, c, j]
//
// Like BlockedMatMul it takes one x and any number of weights, here (codes, scales) pairs:
// QBlockedMatMul(x, q_1, s_1, q_2, s_2, ...) -> y_1, y_2, ... (each pair's G its own).
//
// - one token: per block and group, the codes are widened to float and multiplied with eight
//   accumulators as above, then scaled once per group (weight traffic: a byte per weight);
// - more tokens: each block is dequantized once into a K x 32 float panel (per thread) and
//   multiplied by the float tiles above (the dequantization is 1/M of the work).
//
// edgeadapt.Q4BlockedMatMul — the same for int4 codes packed two per byte
// (edgeadapt/format/nibbles.py): p uint8 (N/32, K, 16), offset binary, column j of a block in
// the low nibble and column j + 16 in the high one,
//
//     p[b, c, j] = (q[b, c, j] + 8) | ((q[b, c, j + 16] + 8) << 4)       j < 16
//
// and the scales and the formula above with q = nibble - 8 (weight traffic: half a byte per
// weight). One token: per c, one 16-byte load of p[b, c, :] zero-extended to 16 lanes; the
// low nibble is lanes 0..15 of the block, the high nibble (>> 4) lanes 16..31, and vpermps
// looks each nibble up in the table {-8, ..., 7} (the low 4 bits of a lane index it, so the
// low nibble needs no mask): the same float codes, accumulated in the same order, as
// QBlockedMatMul's, so the two ops give the same bits for the same codes (one thread, one
// token, K = 576: as fast as QBlockedMatMul with the weights in L2, 0.77-0.85x its time with
// them in L3). More tokens: each block is dequantized into the float panel as above.
//
// Activations: the code forms' attribute accuracy_level, named and valued as MatMulNBits'
// (edgeadapt/graphs/quantized.py sets it to the level of the graph's own MatMulNBits, so a
// layer's k, which one node computes beside its live q and v, keeps its semantics):
//
// - 0 (the default): x as it is, in float: the formulas above;
// - 4: x quantized to int8 per row in blocks of 32 input columns, exactly as ONNX Runtime's
//   MatMulNBits at accuracy level 4 quantizes its activations (MLAS's QuantizeARow_CompInt8,
//   the AVX-512 form; the last block of a row short where 32 does not divide K; the quantizer
//   and the integer tiles live in int8_tiles.h, shared with the ExecuTorch kernel):
//
//       m = max_{c in blk} |x[c]|,   a_blk = m / 127,   xq[c] = rint(x[c] * (127 / m))
//
//   (127 / m a float of its own, not 1 / a_blk: the two differ in the last bit, enough to move
//   a tie; rint: to nearest, ties to even; m = 0: a_blk = 0, xq = 0), and with G a multiple of
//   32 (each group whole blocks of x)
//
//       y[32 b + j] = sum_blk (a_blk * s[b, g(blk), j]) * sum_{c in blk} xq[c] q[b, c, j]
//
//   the inner sums exact in int32, each block's term one float FMA into y, blocks in order (the
//   float operations of MLAS's CompInt8 kernels, which may order the sum otherwise: equal to
//   MatMulNBits at level 4 on the same codes to float rounding).
//
//   One token, G a multiple of 32 (the grids'): with AVX512-VNNI and VBMI, per 4 input columns
//   one 64-byte load of p[b, c..c+3, :] (int8 codes: two, q[b, c..c+3, :]), one vpermb
//   (vpermt2b) that gathers each output column's 4 codes into a 32-bit lane, and vpdpbusd
//   (4 u8 x s8 products summed into each int32 lane), the codes taken unsigned, n = q + o
//   (o = 8: int4's nibbles as stored, split by a mask and a shift; o = 128: int8's sign bit
//   flipped), so sum n xq = sum q xq + o sum xq, the second term once per block of x (its sum
//   computed with xq): 128 weights a load and two vpdpbusd, where the float path converts and
//   multiplies 16 at a time (vpermps + FMA), as MatMulNBits computes level 4. Without VBMI the
//   gather is vpermd + vpshufb (a 4 x 4 transpose of dwords, then of bytes in each 128-bit
//   lane); without VNNI vpdpbusd is vpmaddubsw + vpmaddwd (exact for int4's n <= 15; int8
//   codes there, and every code without AVX-512BW, take plain C++ on the same integers). All
//   are the same float operations (std::fma in C++): every path gives the same bits.
//   SmolLM2's q, k and v at one token, one thread (experiments/q4_activation_probe.py): int4
//   0.46-0.48x the float path's time and 0.76-0.79x MatMulNBits' at level 4 on the same codes;
//   int8 codes 0.78x and 0.82x. (The same CPU built without VBMI: int4 0.47x the float path;
//   without VNNI and VBMI 0.53x, int8 codes 1.3x.)
//
//   More tokens (K and G multiples of 32): each row the integers and float operations of one
//   token, so a prefill and a decode step give the same bits for the same row. Per (chunk,
//   block) item the block's codes are gathered into vpdpbusd's order once (a K/4 x 128-byte
//   panel) and tiles of 4 rows share each gathered load: per 4 input columns 2 loads, 4
//   broadcasts and 8 vpdpbusd for 4 x 32 outputs, where the float tiles convert the block to
//   float first and then take 24 FMAs per input column for 12 x 32.
//   K or G not a multiple of 32: x is replaced by its dequantization xq[c] * a_blk (float) and
//   the float paths above multiply it (its products agree with the int8 path's to rounding).
//
// edgeadapt.BlockOffsets (block_offsets.h): the affine int4 grid's offset term of the readers
// of one x, in one node.
//
// Built against ONNX Runtime's C/C++ API headers (scripts/ort_headers.py installs them) and
// loaded with SessionOptions.register_custom_ops_library:
// edgeadapt/runtime/backends/onnxruntime/kernel.py.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "block_offsets.h"
#include "int8_tiles.h"
#include "ort_kernel.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using int8_tiles::AB;
using int8_tiles::BW;  // columns per block (the layout's)
using int8_tiles::IR;
using int8_tiles::quantize_row;
#if defined(__AVX512BW__)
using int8_tiles::dot4;
using int8_tiles::four_bytes;
using int8_tiles::itile_rows;
#endif

constexpr int MR = 12;      // rows per tile
constexpr int64_t MC = 96;  // rows per chunk: 96 * K floats of x (221 KB at K = 576)

// the code forms' accuracy_level (MatMulNBits' values): float activations, or int8 per block
enum Level : int64_t { FLOAT_ACTIVATIONS = 0, INT8_ACTIVATIONS = 4 };

// What the weight operand holds: float weights (BlockedMatMul), int8 codes one per byte
// (QBlockedMatMul) or int4 codes two per byte (Q4BlockedMatMul); the codes come with scales.
enum class Form { Float, Int8, Int4 };

// the weight operand's last dimension: a block row of 32 weights or codes, 16 bytes for int4
// (two codes a byte); for the code forms also the bytes of a block row
template <Form F>
constexpr int64_t row_width = F == Form::Int4 ? BW / 2 : BW;

// y[n0 + j] = sum_c x[c] w[c, j], j < 32, for one block w (K, 32)
void gemv_block(const float* __restrict x, const float* __restrict w, float* __restrict y,
                int64_t K) {
#if defined(__AVX512F__)
  __m512 a[4], b[4];
  for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 4 <= K; c += 4) {
    for (int i = 0; i < 4; ++i) {
      const __m512 s = _mm512_set1_ps(x[c + i]);
      a[i] = _mm512_fmadd_ps(s, _mm512_loadu_ps(w + (c + i) * BW), a[i]);
      b[i] = _mm512_fmadd_ps(s, _mm512_loadu_ps(w + (c + i) * BW + 16), b[i]);
    }
  }
  for (; c < K; ++c) {
    const __m512 s = _mm512_set1_ps(x[c]);
    a[0] = _mm512_fmadd_ps(s, _mm512_loadu_ps(w + c * BW), a[0]);
    b[0] = _mm512_fmadd_ps(s, _mm512_loadu_ps(w + c * BW + 16), b[0]);
  }
  _mm512_storeu_ps(y, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_add_ps(b[0], b[1]), _mm512_add_ps(b[2], b[3])));
#else
  float acc[BW] = {0};
  for (int64_t c = 0; c < K; ++c)
    for (int64_t j = 0; j < BW; ++j) acc[j] += x[c] * w[c * BW + j];
  for (int64_t j = 0; j < BW; ++j) y[j] = acc[j];
#endif
}

// y[r, j] = sum_c x[r, c] w[c, j] for R rows (x row stride K, y row stride ldy), one block
template <int R>
void tile(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
          int64_t ldy) {
#if defined(__AVX512F__)
  __m512 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; ++c) {
    const __m512 w0 = _mm512_loadu_ps(w + c * BW), w1 = _mm512_loadu_ps(w + c * BW + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(x[r * K + c]);
      lo[r] = _mm512_fmadd_ps(s, w0, lo[r]);
      hi[r] = _mm512_fmadd_ps(s, w1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * ldy, lo[r]);
    _mm512_storeu_ps(y + r * ldy + 16, hi[r]);
  }
#else
  float acc[R][BW] = {};
  for (int64_t c = 0; c < K; ++c)
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < BW; ++j) acc[r][j] += x[r * K + c] * w[c * BW + j];
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < BW; ++j) y[r * ldy + j] = acc[r][j];
#endif
}

// the 32 codes of one block row r as floats (the portable path's and the dequantization's)
template <Form F>
inline void row_codes(const uint8_t* __restrict r, float* __restrict w) {
  if constexpr (F == Form::Int4) {
    for (int64_t j = 0; j < BW / 2; ++j) {
      w[j] = static_cast<float>((r[j] & 15) - 8);
      w[j + BW / 2] = static_cast<float>((r[j] >> 4) - 8);
    }
  } else {
    for (int64_t j = 0; j < BW; ++j) w[j] = static_cast<float>(static_cast<int8_t>(r[j]));
  }
}

#if defined(__AVX512F__)
// codes 0..15 (lo) and 16..31 (hi) of one block row r as floats
template <Form F>
inline void load_codes(const uint8_t* r, __m512& lo, __m512& hi) {
  if constexpr (F == Form::Int4) {
    // byte j: nibble q[j] + 8 low, q[j + 16] + 8 high. vpermps indexes {-8, ..., 7} by a
    // lane's low 4 bits: nibble - 8 as an exact float in one instruction, the low nibble
    // unmasked (mask or shift, convert, subtract: three per half, 1.33x QBlockedMatMul's
    // time with the weights in L2, where this form matches it)
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
    lo = _mm512_permutexvar_ps(n, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(n, 4), table);
  } else {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(r))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 16))));
  }
}
#endif

// y[j] = sum_g s[g, j] sum_{c in g} x[c] q[c, j], j < 32, for one block of codes (K rows of
// row_width<F> bytes) and its scales s (K/G, 32)
template <Form F>
void qgemv_block(const float* __restrict x, const uint8_t* __restrict q,
                 const float* __restrict s, float* __restrict y, int64_t K, int64_t G) {
  constexpr int64_t RB = row_width<F>;
#if defined(__AVX512F__)
  __m512 ya = _mm512_setzero_ps(), yb = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    __m512 a[4], b[4];
    for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm512_setzero_ps();
    const int64_t g1 = g0 + G;
    int64_t c = g0;
    for (; c + 4 <= g1; c += 4)
      for (int i = 0; i < 4; ++i) {
        const __m512 xs = _mm512_set1_ps(x[c + i]);
        __m512 w0, w1;
        load_codes<F>(q + (c + i) * RB, w0, w1);
        a[i] = _mm512_fmadd_ps(xs, w0, a[i]);
        b[i] = _mm512_fmadd_ps(xs, w1, b[i]);
      }
    for (; c < g1; ++c) {
      const __m512 xs = _mm512_set1_ps(x[c]);
      __m512 w0, w1;
      load_codes<F>(q + c * RB, w0, w1);
      a[0] = _mm512_fmadd_ps(xs, w0, a[0]);
      b[0] = _mm512_fmadd_ps(xs, w1, b[0]);
    }
    const float* sg = s + (g0 / G) * BW;
    ya = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                         _mm512_loadu_ps(sg), ya);
    yb = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(b[0], b[1]), _mm512_add_ps(b[2], b[3])),
                         _mm512_loadu_ps(sg + 16), yb);
  }
  _mm512_storeu_ps(y, ya);
  _mm512_storeu_ps(y + 16, yb);
#else
  float acc[BW] = {0};
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    float part[BW] = {0}, w[BW];
    for (int64_t c = g0; c < g0 + G; ++c) {
      row_codes<F>(q + c * RB, w);
      for (int64_t j = 0; j < BW; ++j) part[j] += x[c] * w[j];
    }
    for (int64_t j = 0; j < BW; ++j) acc[j] += part[j] * s[(g0 / G) * BW + j];
  }
  for (int64_t j = 0; j < BW; ++j) y[j] = acc[j];
#endif
}

// panel[c, j] = q[c, j] * s[c / G, j]: one block dequantized, (K, 32) floats
template <Form F>
void dequantize_block(const uint8_t* __restrict q, const float* __restrict s,
                      float* __restrict panel, int64_t K, int64_t G) {
  for (int64_t c = 0; c < K; ++c) {
    const float* sg = s + (c / G) * BW;
    float* w = panel + c * BW;
    row_codes<F>(q + c * row_width<F>, w);
    for (int64_t j = 0; j < BW; ++j) w[j] *= sg[j];
  }
}

// what the int8 path adds to each code to take it as vpdpbusd's unsigned operand: int4's
// nibbles are stored offset by 8; int8's sign bit is flipped (+128)
template <Form F>
constexpr int32_t code_offset = F == Form::Int4 ? 8 : 128;

#if defined(__AVX512BW__)
// the int8 path in AVX-512 for form F: both forms with VNNI; int4 only without (its u8 x s8
// pairs, 2 * 15 * 127, fit vpmaddubsw's int16, int8's 2 * 255 * 127 do not)
template <Form F>
#if defined(__AVX512VNNI__)
constexpr bool avx512_int8 = true;
#else
constexpr bool avx512_int8 = F == Form::Int4;
#endif

#if !defined(__AVX512VBMI__)
// without vpermb: dwords 4 t + L of v -> 4 L + t (vpermd), then in each 128-bit lane the 4 x 4
// bytes 4 t + i -> 4 i + t (vpshufb): bytes 16 t + 4 L + i -> 16 L + 4 i + t
inline __m512i transpose_lanes(__m512i v) {
  const __m512i lanes = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512i bytes = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(lanes, v), bytes);
}
#endif

// the unsigned codes n = q + o of input columns c..c+3 (r: row c of a block) for output columns
// 0..15 (lo) and 16..31 (hi), lane j holding those of column j (input column c + t in byte t),
// vpdpbusd's order
template <Form F>
inline void load_quad(const uint8_t* r, __m512i& lo, __m512i& hi) {
  if constexpr (F == Form::Int4) {
    // bytes 16 t + j (row c + t, column j | j + 16) -> byte 4 j + t; then the two nibbles
#if defined(__AVX512VBMI__)
    const __m512i idx = _mm512_set_epi32(
        0x3f2f1f0f, 0x3e2e1e0e, 0x3d2d1d0d, 0x3c2c1c0c, 0x3b2b1b0b, 0x3a2a1a0a, 0x39291909,
        0x38281808, 0x37271707, 0x36261606, 0x35251505, 0x34241404, 0x33231303, 0x32221202,
        0x31211101, 0x30201000);
    const __m512i v = _mm512_permutexvar_epi8(idx, _mm512_loadu_si512(r));
#else
    const __m512i v = transpose_lanes(_mm512_loadu_si512(r));
#endif
    const __m512i nib = _mm512_set1_epi8(15);
    lo = _mm512_and_si512(v, nib);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
  } else {
    // rows c..c+3 are bytes 32 t + j of the 128 bytes a | b -> byte 4 j + t (lo) and
    // 32 t + 16 + j -> 4 j + t (hi); then q + 128 = q ^ 0x80 as a u8
    const __m512i a = _mm512_loadu_si512(r), b = _mm512_loadu_si512(r + 64);
#if defined(__AVX512VBMI__)
    const __m512i idx_lo = _mm512_set_epi32(
        0x6f4f2f0f, 0x6e4e2e0e, 0x6d4d2d0d, 0x6c4c2c0c, 0x6b4b2b0b, 0x6a4a2a0a, 0x69492909,
        0x68482808, 0x67472707, 0x66462606, 0x65452505, 0x64442404, 0x63432303, 0x62422202,
        0x61412101, 0x60402000);
    const __m512i idx_hi = _mm512_add_epi8(idx_lo, _mm512_set1_epi8(16));
    const __m512i tlo = _mm512_permutex2var_epi8(a, idx_lo, b);
    const __m512i thi = _mm512_permutex2var_epi8(a, idx_hi, b);
#else
    // the 128-bit lanes of rows c..c+3 for columns 0..15 (a's 0 and 2, b's 0 and 2) and
    // 16..31 (the lanes after them) side by side (vpermt2d), then transposed in each lane
    const __m512i lanes = _mm512_set_epi32(27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16,
                                           8, 0);
    const __m512i four = _mm512_set1_epi32(4);
    const __m512i bytes = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i tlo = _mm512_shuffle_epi8(_mm512_permutex2var_epi32(a, lanes, b), bytes);
    const __m512i thi = _mm512_shuffle_epi8(
        _mm512_permutex2var_epi32(a, _mm512_add_epi32(lanes, four), b), bytes);
#endif
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
    lo = _mm512_xor_si512(tlo, sign);
    hi = _mm512_xor_si512(thi, sign);
  }
}
#else
template <Form F>
constexpr bool avx512_int8 = false;
#endif

// Level 4, one token: y[j] = sum_blk (xa[blk] s[g(blk), j]) * sum_{c in blk} xq[c] q[c, j],
// j < 32, for one block of codes (K rows of row_width<F> bytes, K a multiple of AB) and its
// scales s (K/G, 32), G a multiple of AB; xsum: the sums of xq per block
template <Form F>
void igemv_block(const int8_t* __restrict xq, const float* __restrict xa,
                 const int32_t* __restrict xsum, const uint8_t* __restrict q,
                 const float* __restrict s, float* __restrict y, int64_t K, int64_t G) {
  constexpr int64_t RB = row_width<F>;
#if defined(__AVX512BW__)
  if constexpr (avx512_int8<F>) {
    __m512 ya = _mm512_setzero_ps(), yb = _mm512_setzero_ps();
    for (int64_t c0 = 0, blk = 0; c0 < K; c0 += AB, ++blk) {
      // two sums per half (vpdpbusd's latency), each over every other 4 input columns
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
      for (int64_t c = c0; c < c0 + AB; c += 8) {
        __m512i lo, hi;
        load_quad<F>(q + c * RB, lo, hi);
        const __m512i x0 = _mm512_set1_epi32(four_bytes(xq + c));
        a0 = dot4(a0, lo, x0);
        b0 = dot4(b0, hi, x0);
        load_quad<F>(q + (c + 4) * RB, lo, hi);
        const __m512i x1 = _mm512_set1_epi32(four_bytes(xq + c + 4));
        a1 = dot4(a1, lo, x1);
        b1 = dot4(b1, hi, x1);
      }
      const __m512i off = _mm512_set1_epi32(code_offset<F> * xsum[blk]);
      const __m512i ia = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), off);
      const __m512i ib = _mm512_sub_epi32(_mm512_add_epi32(b0, b1), off);
      const float* sg = s + (c0 / G) * BW;
      const __m512 xs = _mm512_set1_ps(xa[blk]);
      ya = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_mul_ps(xs, _mm512_loadu_ps(sg)), ya);
      yb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib), _mm512_mul_ps(xs, _mm512_loadu_ps(sg + 16)),
                           yb);
    }
    _mm512_storeu_ps(y, ya);
    _mm512_storeu_ps(y + 16, yb);
    return;
  }
#endif
  // the same integers (sum q xq directly: n xq - o xq summed is the same number) and the same
  // float operations, one FMA per block and column
  (void)xsum;
  float acc[BW] = {0};
  for (int64_t c0 = 0, blk = 0; c0 < K; c0 += AB, ++blk) {
    int32_t part[BW] = {0};
    for (int64_t c = c0; c < c0 + AB; ++c) {
      const uint8_t* r = q + c * RB;
      const int32_t xc = xq[c];
      if constexpr (F == Form::Int4) {
        for (int64_t j = 0; j < BW / 2; ++j) {
          part[j] += ((r[j] & 15) - 8) * xc;
          part[j + BW / 2] += ((r[j] >> 4) - 8) * xc;
        }
      } else {
        for (int64_t j = 0; j < BW; ++j) part[j] += static_cast<int8_t>(r[j]) * xc;
      }
    }
    const float* sg = s + (c0 / G) * BW;
    for (int64_t j = 0; j < BW; ++j)
      acc[j] = std::fma(static_cast<float>(part[j]), xa[blk] * sg[j], acc[j]);
  }
  for (int64_t j = 0; j < BW; ++j) y[j] = acc[j];
}

// Level 4, more tokens: rows [m0, m1) of the int8 activations xq (row stride nb AB bytes; xa,
// xsum nb per row) times one block of codes, y rows ldy apart: per row igemv_block's integers and
// float operations, so every row gets the bits a one-token call of it gets. With AVX-512 the
// block's codes are gathered into vpdpbusd's order once (panel: K/4 (lo, hi) pairs, reused by
// every row: the gather is 1/M of the work) and IR rows share each pair's loads.
template <Form F>
void igemm_block(const int8_t* xq, const float* xa, const int32_t* xsum, const uint8_t* q,
                 const float* s, float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t K,
                 int64_t G) {
  const int64_t nb = K / AB;
#if defined(__AVX512BW__)
  if constexpr (avx512_int8<F>) {
    constexpr int64_t RB = row_width<F>;
    thread_local std::vector<uint8_t> panel;
    panel.resize(static_cast<size_t>(K / 4 * 128));
    for (int64_t c = 0; c < K; c += 4) {
      __m512i lo, hi;
      load_quad<F>(q + c * RB, lo, hi);
      _mm512_storeu_si512(panel.data() + (c / 4) * 128, lo);
      _mm512_storeu_si512(panel.data() + (c / 4) * 128 + 64, hi);
    }
    for (int64_t m = m0; m < m1; m += IR) {
      const int rows = static_cast<int>(std::min<int64_t>(IR, m1 - m));
      itile_rows<code_offset<F>>(rows, xq + m * nb * AB, nb, xa + m * nb, xsum + m * nb, panel.data(), s,
                    y + m * ldy, ldy, K, G, std::make_integer_sequence<int, IR>{});
    }
    return;
  }
#endif
  for (int64_t m = m0; m < m1; ++m)
    igemv_block<F>(xq + m * nb * AB, xa + m * nb, xsum + m * nb, q, s, y + m * ldy, K, G);
}

template <int... Rs>
void tile_rows(int rows, const float* x, const float* w, float* y, int64_t K, int64_t ldy,
               std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? (tile<Rs + 1>(x, w, y, K, ldy), 0) : 0), ...);
}

struct Job {
  const float* x;    // level 4: the dequantized activations
  const float* w;    // float weight, or
  const uint8_t* q;  // codes (int8 one per byte, or int4 two per byte) with
  const float* s;    // their scales, G input columns per scale
  float* y;
  int64_t M, K, N, blocks, chunks, G;
  // level 4, K and G multiples of AB: the int8 activations of every row, their scales and
  // sums per block (igemv_block, igemm_block); null otherwise
  const int8_t* xq = nullptr;
  const float* xa = nullptr;
  const int32_t* xsum = nullptr;
};

// rows [m0, m1) of x times one float block w (K, 32)
void rows_times_block(const Job& j, const float* w, int64_t b, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, m1 - m));
    tile_rows(rows, j.x + m * j.K, w, j.y + m * j.N + b * BW, j.K, j.N,
              std::make_integer_sequence<int, MR>{});
  }
}

// one (chunk, block) pair of job j: rows [MC q, MC q + MC) of x times block b of its weight
template <Form F>
void run_job_item(const Job& j, int64_t item) {
  const int64_t q = item / j.blocks, b = item % j.blocks;
  const int64_t m0 = q * MC, m1 = std::min(j.M, (q + 1) * MC);
  if constexpr (F == Form::Float) {
    const float* w = j.w + b * j.K * BW;
    if (j.M == 1)
      gemv_block(j.x, w, j.y + b * BW, j.K);
    else
      rows_times_block(j, w, b, m0, m1);
  } else {
    const uint8_t* qb = j.q + b * j.K * row_width<F>;
    const float* sb = j.s + b * (j.K / j.G) * BW;
    if (j.xq != nullptr) {
      if (j.M == 1)
        igemv_block<F>(j.xq, j.xa, j.xsum, qb, sb, j.y + b * BW, j.K, j.G);
      else
        igemm_block<F>(j.xq, j.xa, j.xsum, qb, sb, j.y + b * BW, j.N, m0, m1, j.K, j.G);
      return;
    }
    if (j.M == 1) {
      qgemv_block<F>(j.x, qb, sb, j.y + b * BW, j.K, j.G);
      return;
    }
    thread_local std::vector<float> panel;
    panel.resize(static_cast<size_t>(j.K * BW));
    dequantize_block<F>(qb, sb, panel.data(), j.K, j.G);
    rows_times_block(j, panel.data(), b, m0, m1);
  }
}

// the jobs of one call (one per weight) and where each one's items start in the call's
struct Jobs {
  std::vector<Job> jobs;
  std::vector<size_t> first;  // first[i]: job i's first item; first.back(): the total
};

template <Form F>
void run_item(void* data, size_t item) {
  const Jobs& all = *static_cast<const Jobs*>(data);
  size_t i = 0;
  while (item >= all.first[i + 1]) ++i;
  run_job_item<F>(all.jobs[i], static_cast<int64_t>(item - all.first[i]));
}

// per form: the op's name, its weight operand's element type, and what a bad shape is told
template <Form F>
struct Names;
template <>
struct Names<Form::Float> {
  static constexpr const char* op = "BlockedMatMul";
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  static constexpr const char* shapes =
      "edgeadapt.BlockedMatMul: need x (..., K) and weights (N/32, K, 32) with the same K";
  static constexpr const char* levels =
      "edgeadapt.BlockedMatMul: float weights take no accuracy_level (float activations only)";
};
template <>
struct Names<Form::Int8> {
  static constexpr const char* op = "QBlockedMatMul";
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  static constexpr const char* shapes =
      "edgeadapt.QBlockedMatMul: need x (..., K) and codes (N/32, K, 32) with the same K";
  static constexpr const char* scales =
      "edgeadapt.QBlockedMatMul: need scales (N/32, K/G, 32) for codes (N/32, K, 32)";
  static constexpr const char* levels =
      "edgeadapt.QBlockedMatMul: accuracy_level must be 0 (float activations) or 4 (int8)";
};
template <>
struct Names<Form::Int4> {
  static constexpr const char* op = "Q4BlockedMatMul";
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  static constexpr const char* shapes =
      "edgeadapt.Q4BlockedMatMul: need x (..., K) and packed codes (N/32, K, 16) with the same K";
  static constexpr const char* scales =
      "edgeadapt.Q4BlockedMatMul: need scales (N/32, K/G, 32) for packed codes (N/32, K, 16)";
  static constexpr const char* levels =
      "edgeadapt.Q4BlockedMatMul: accuracy_level must be 0 (float activations) or 4 (int8)";
};

// Level 4: x (M rows of K) quantized per row (quantize_row), for the whole call
struct Activations {
  std::vector<int8_t> q;     // M rows of K rounded up to whole blocks
  std::vector<float> a;      // M rows of K/AB (rounded up) scales
  std::vector<int32_t> sum;  // and sums of q
  std::vector<float> x;      // M rows of K: q * a, the float paths' x

  void quantize(const float* x_in, int64_t M, int64_t K) {
    const int64_t nb = (K + AB - 1) / AB;
    q.resize(static_cast<size_t>(M * nb * AB));
    a.resize(static_cast<size_t>(M * nb));
    sum.resize(a.size());
    x.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      quantize_row(x_in + m * K, K, q.data() + m * nb * AB, a.data() + m * nb,
                   sum.data() + m * nb, x.data() + m * K);
  }
};

template <Form F>
struct Kernel {
  int64_t level = FLOAT_ACTIVATIONS;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return ort_kernel::status_of([&]() -> OrtStatusPtr {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue xv = ctx.GetInput(0);
      const std::vector<int64_t> xs = xv.GetTensorTypeAndShapeInfo().GetShape();
      if (xs.empty()) return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, Names<F>::shapes);
      const int64_t M = ort_kernel::leading_rows(xs);
      // the float form: a weight per input after x; the code forms: (codes, scales) pairs
      constexpr size_t per = F == Form::Float ? 1 : 2;
      const size_t weights = (ctx.GetInputCount() - 1) / per;
      if (weights * per + 1 != ctx.GetInputCount())
        return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, Names<F>::shapes);
      Jobs all;
      all.first.push_back(0);
      for (size_t i = 0; i < weights; ++i) {
        const Ort::ConstValue wv = ctx.GetInput(1 + per * i);
        const Ort::TensorTypeAndShapeInfo wi = wv.GetTensorTypeAndShapeInfo();
        const std::vector<int64_t> ws = wi.GetShape();
        if (ws.size() != 3 || ws[2] != row_width<F> || ws[1] != xs.back() ||
            wi.GetElementType() != Names<F>::type)
          return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, Names<F>::shapes);
        Job job{xv.GetTensorData<float>(), nullptr, nullptr, nullptr, nullptr, M, ws[1],
                ws[0] * BW, ws[0], (M + MC - 1) / MC, ws[1]};
        if constexpr (F != Form::Float) {
          const Ort::ConstValue sv = ctx.GetInput(2 + per * i);
          const Ort::TensorTypeAndShapeInfo si = sv.GetTensorTypeAndShapeInfo();
          const std::vector<int64_t> ss = si.GetShape();
          if (ss.size() != 3 || ss[0] != ws[0] || ss[2] != BW || ss[1] < 1 || ws[1] % ss[1] ||
              si.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, Names<F>::scales);
          job.q = static_cast<const uint8_t*>(wv.GetTensorRawData());
          job.s = sv.GetTensorData<float>();
          job.G = ws[1] / ss[1];
        } else {
          job.w = wv.GetTensorData<float>();
        }
        std::vector<int64_t> ys(xs);
        ys.back() = job.N;
        job.y = ctx.GetOutput(i, ys).GetTensorMutableData<float>();
        if (M > 0 && job.N > 0) {
          all.jobs.push_back(job);
          all.first.push_back(all.first.back() + static_cast<size_t>(job.chunks * job.blocks));
        }
      }
      if (all.jobs.empty()) return nullptr;
      if (level == INT8_ACTIVATIONS) {
        // once per call (the jobs share x); the calling thread's buffers, read by the pool's
        // threads while it waits in ParallelFor
        thread_local Activations act;
        const int64_t K = xs.back();
        act.quantize(all.jobs[0].x, M, K);
        for (Job& job : all.jobs) {
          job.x = act.x.data();
          if (K % AB == 0 && job.G % AB == 0) {
            job.xq = act.q.data();
            job.xa = act.a.data();
            job.xsum = act.sum.data();
          }
        }
      }
      ctx.ParallelFor(run_item<F>, all.first.back(), 0, &all);
      return nullptr;
    });
  }
};

template <Form F>
struct Op : Ort::CustomOpBase<Op<F>, Kernel<F>, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                              void** kernel) const {
    // accuracy_level: absent is 0; the float form has no activations to quantize
    int64_t level = FLOAT_ACTIVATIONS;
    if (OrtStatus* absent = api.KernelInfoGetAttribute_int64(info, "accuracy_level", &level)) {
      api.ReleaseStatus(absent);
      level = FLOAT_ACTIVATIONS;
    }
    if (level != FLOAT_ACTIVATIONS && (F == Form::Float || level != INT8_ACTIVATIONS))
      return api.CreateStatus(ORT_INVALID_ARGUMENT, Names<F>::levels);
    auto k = std::make_unique<Kernel<F>>();
    k->level = level;
    *kernel = k.release();
    return nullptr;
  }
  const char* GetName() const { return Names<F>::op; }
  // x, then one or more weights (variadic: float weights, or (codes, scales) pairs, whose
  // types the kernel checks), one output per weight
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 && F != Form::Float ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                      : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 1 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
  }
  bool GetVariadicInputHomogeneity() const { return F == Form::Float; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return INPUT_OUTPUT_VARIADIC;
  }
};

std::mutex domains_lock;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;  // live as long as the library
Op<Form::Float> the_op;
Op<Form::Int8> the_qop;
Op<Form::Int4> the_q4op;
block_offsets::Op the_offsets_op;

}  // namespace

// Called by ONNX Runtime once per SessionOptions.register_custom_ops_library.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);  // older than the runtime's: fine
  if (api == nullptr) return nullptr;  // a runtime older than the headers: the op stays unknown
  Ort::InitApi(api);
  try {
    auto domain = std::make_unique<Ort::CustomOpDomain>("edgeadapt");
    domain->Add(&the_op);
    domain->Add(&the_qop);
    domain->Add(&the_q4op);
    domain->Add(&the_offsets_op);
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> guard(domains_lock);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
