// edgeadapt::cache_attention.out — an ExecuTorch kernel for the decoder's causal attention over
// its static KV cache, reading the cache buffers in place:
//
//     q (1, H, S, D)   the new tokens' rotated queries        H = KV * G heads, head h = j G + g
//     k, v (1, KV, C, D)  the cache buffers (the new tokens' keys and values already written)
//     positions (T,)   only its length T is read: the positions held, the new tokens the last S
//
//     L_i = T - S + i + 1                                      (token i sees positions < L_i)
//     out[0, i, h D + d] = sum_{p < L_i} softmax_p(scale q[h, i] . k[j, p]) v[j, p, d]
//
// Why: written with standard ops, ExecuTorch copies the held prefix of every cache buffer
// (slice_copy: 47 MB a step at 1,024 positions on SmolLM2) before XNNPACK's two bmm read it.
// This kernel reads each key and value once, where the cache holds them.
//
// How (split-K, as flash-decoding): the T positions are cut into blocks of PB; each (kv head j,
// block b) is one task of ExecuTorch's threadpool, computing for each of its R = G S query rows
// r = g S + i (they are contiguous in q: head j G + g, token i) over the positions of the block
// it may see (the scores as dot products for a few rows, from the block's keys transposed for
// many; the weighted values for 16 / (D / 16) rows at once, their sums in registers),
//
//     m = max_p s_p,  s_p = scale q_r . k_p;   l = sum_p e^{s_p - m};   a = sum_p e^{s_p - m} v_p
//
// and the rows are merged over the blocks on the calling thread (M = max_b m_b):
//
//     out_r = sum_b e^{m_b - M} a_b / sum_b e^{m_b - M} l_b
//
// A block a row may not see at all has l = 0 and is skipped. e^x: a Cephes-style polynomial
// on 16 lanes with AVX-512 (relative error about 1e-7), std::exp elsewhere.
//
// Registered into ExecuTorch's kernel registry when this library is loaded
// (edgeadapt/runtime/backends/executorch/kernel.py builds and loads it beside live_linear).

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

constexpr int64_t PB = 128;  // positions per block: 2 x 32 KB of keys and values at D = 64

// q . k over D floats (16 lanes, then the tail)
inline float dot(const float* __restrict q, const float* __restrict k, int64_t D) {
  float acc[16] = {0};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int j = 0; j < 16; ++j) acc[j] += q[d + j] * k[d + j];
  float s = 0;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

#if defined(__AVX512F__)
// e^x on 16 lanes (x <= 0 here): x = n ln2 + r, |r| <= ln2 / 2, e^r a degree-7 polynomial
// (Cephes expf), scaled by 2^n
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// e[p] = e^{s[p] - m} for p < n; returns their sum
inline float exp_sum(const float* s, float* e, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 k = n - p >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - p)) - 1);
    const __m512 v = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + p), mv));
    _mm512_mask_storeu_ps(e + p, k, v);
    sum = _mm512_mask_add_ps(sum, k, sum, v);
  }
  return _mm512_reduce_add_ps(sum);
}
#else
inline float exp_sum(const float* s, float* e, int64_t n, float m) {
  float sum = 0;
  for (int64_t p = 0; p < n; ++p) sum += (e[p] = std::exp(s[p] - m));
  return sum;
}
#endif

// s[p] = scale q . k_p for the n positions of a block, from its keys transposed, kt[d][p]
// (D x PB, zero past the block's end): 16 positions at a time, one FMA per d, no horizontal
// sums (the prefill's form: the transpose is shared by the block's many rows); s gets n
// rounded up to 16 entries
void scores_t(const float* __restrict q, const float* __restrict kt, float* __restrict s,
              int64_t D, int64_t n, float scale) {
  for (int64_t p0 = 0; p0 < n; p0 += 16) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(kt + d * PB + p0), acc);
    _mm512_storeu_ps(s + p0, _mm512_mul_ps(acc, _mm512_set1_ps(scale)));
#else
    float acc[16] = {0};
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[d];
      const float* __restrict k = kt + d * PB + p0;
      for (int j = 0; j < 16; ++j) acc[j] += qd * k[j];
    }
    for (int j = 0; j < 16; ++j) s[p0 + j] = scale * acc[j];
#endif
  }
}

// a_i = sum_{p < n} e_i[p] v_p for the rows i < rows of a group (e_i: row i of e, PB floats,
// zero past the row's positions; a_i: D floats at a + i D)
#if defined(__AVX512F__)
// D = 16 DC: 16 / DC rows at once, their accumulators in registers, each value row loaded once
template <int DC>
void values_rows(const float* __restrict e, const float* __restrict V, int64_t n,
                 float* __restrict a, int rows) {
  constexpr int RB = 16 / DC, D = 16 * DC;
  __m512 acc[RB][DC];
  for (int i = 0; i < RB; ++i)
    for (int c = 0; c < DC; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    __m512 v[DC];
    for (int c = 0; c < DC; ++c) v[c] = _mm512_loadu_ps(V + p * D + 16 * c);
    for (int i = 0; i < RB; ++i) {
      const __m512 w = _mm512_set1_ps(e[i * PB + p]);
      for (int c = 0; c < DC; ++c) acc[i][c] = _mm512_fmadd_ps(w, v[c], acc[i][c]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(a + i * D + 16 * c, acc[i][c]);
}
#endif

void values_generic(const float* __restrict e, const float* __restrict V, int64_t D, int64_t n,
                    float* __restrict a, int rows) {
  for (int i = 0; i < rows; ++i) {
    float* __restrict ai = a + i * D;
    std::fill(ai, ai + D, 0.f);
    for (int64_t p = 0; p < n; ++p) {
      const float w = e[i * PB + p];
      const float* __restrict vp = V + p * D;
      for (int64_t d = 0; d < D; ++d) ai[d] += w * vp[d];
    }
  }
}

// The rows a group of the value pass takes: 16 / (D / 16) where the vector path has a form for
// D, else 1
int group_rows(int64_t D) {
#if defined(__AVX512F__)
  if (D == 16 || D == 32 || D == 64 || D == 128) return static_cast<int>(256 / D);
#endif
  return 1;
}

void values(const float* e, const float* V, int64_t D, int64_t n, float* a, int rows) {
#if defined(__AVX512F__)
  switch (D) {
    case 16: return values_rows<1>(e, V, n, a, rows);
    case 32: return values_rows<2>(e, V, n, a, rows);
    case 64: return values_rows<4>(e, V, n, a, rows);
    case 128: return values_rows<8>(e, V, n, a, rows);
    default: break;
  }
#endif
  values_generic(e, V, D, n, a, rows);
}

// A task's results in its R * (D + 2) floats: each row's a (D floats), then the R m's, then
// the R l's
struct Part {
  float* a;
  float* m;
  float* l;
};

inline Part part_at(float* base, int64_t R, int64_t D) {
  return {base, base + R * D, base + R * D + R};
}

// One task: kv head j, positions [p0, p1); for each of its R rows the block's m, l and a into
// its Part. Rows go in groups of group_rows(D) (the value pass's); a block of many rows (a
// prefill chunk) has its keys transposed once for scores_t, a block of few (a decode step)
// takes dot products.
void block(const float* __restrict Q, const float* __restrict K, const float* __restrict V,
           float* __restrict part, int64_t R, int64_t S, int64_t T, int64_t D, int64_t p0,
           int64_t p1, float scale) {
  const int RB = group_rows(D);
  const bool transpose = R >= 8;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(PB + RB * PB + (transpose ? D * PB : 0)));
  float* s = buf.data();
  float* e = s + PB;
  float* kt = e + RB * PB;
  const int64_t nb = p1 - p0, padded = (nb + 15) / 16 * 16;
  if (transpose) {
    for (int64_t p = 0; p < nb; ++p)
      for (int64_t d = 0; d < D; ++d) kt[d * PB + p] = K[(p0 + p) * D + d];
    for (int64_t d = 0; d < D; ++d) std::fill(kt + d * PB + nb, kt + d * PB + padded, 0.f);
  }
  const Part out = part_at(part, R, D);
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int rows = static_cast<int>(std::min<int64_t>(RB, R - r0));
    int64_t most = 0;
    int64_t seen[16];
    for (int i = 0; i < rows; ++i) {
      const int64_t r = r0 + i, n = std::min(p1, T - S + r % S + 1) - p0;
      seen[i] = std::max<int64_t>(n, 0);
      most = std::max(most, seen[i]);
      if (n <= 0) {
        out.m[r] = -std::numeric_limits<float>::infinity();
        out.l[r] = 0.f;
        continue;
      }
      const float* q = Q + r * D;
      if (transpose) {
        scores_t(q, kt, s, D, n, scale);
      } else {
        for (int64_t p = 0; p < n; ++p) s[p] = scale * dot(q, K + (p0 + p) * D, D);
      }
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < n; ++p) m = std::max(m, s[p]);
      out.l[r] = exp_sum(s, e + i * PB, n, m);
      out.m[r] = m;
    }
    for (int i = 0; i < RB; ++i)  // rows past their positions, and past the group, weigh 0
      std::fill(e + i * PB + (i < rows ? seen[i] : 0), e + i * PB + most, 0.f);
    values(e, V + p0 * D, D, most, out.a + r0 * D, rows);
  }
}

Tensor& cache_attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k,
                            const Tensor& v, const Tensor& positions, double scale,
                            Tensor& out) {
  using executorch::aten::ScalarType;
  using executorch::aten::SizesType;
  const bool shapes = q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && positions.dim() == 1 &&
                      q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1;
  ET_KERNEL_CHECK(ctx, shapes && q.scalar_type() == ScalarType::Float &&
                  k.scalar_type() == ScalarType::Float && v.scalar_type() == ScalarType::Float &&
                  out.scalar_type() == ScalarType::Float, InvalidArgument, out);
  const int64_t H = q.size(1), S = q.size(2), D = q.size(3), KV = k.size(1), C = k.size(2);
  const int64_t T = positions.size(0);
  ET_KERNEL_CHECK(ctx, KV >= 1 && H % KV == 0 && k.size(3) == D && v.size(1) == KV &&
                  v.size(2) == C && v.size(3) == D && S >= 1 && S <= T && T <= C,
                  InvalidArgument, out);
  const SizesType sizes[3] = {1, static_cast<SizesType>(S), static_cast<SizesType>(H * D)};
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, {sizes, 3}) ==
                  executorch::runtime::Error::Ok, InvalidArgument, out);
  const int64_t G = H / KV, R = G * S, blocks = (T + PB - 1) / PB, width = R * (D + 2);
  const float* Q = q.const_data_ptr<float>();
  const float* Kc = k.const_data_ptr<float>();
  const float* Vc = v.const_data_ptr<float>();
  float* Y = out.mutable_data_ptr<float>();
  thread_local std::vector<float> parts_buf;
  parts_buf.resize(static_cast<size_t>(KV * blocks * width));
  float* parts = parts_buf.data();  // the workers get this pointer
  const float sc = static_cast<float>(scale);
  executorch::extension::parallel_for(0, KV * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t j = t / blocks, b = t % blocks;
      block(Q + j * R * D, Kc + j * C * D, Vc + j * C * D, parts + t * width, R, S, T, D,
            b * PB, std::min(T, (b + 1) * PB), sc);
    }
  });
  for (int64_t j = 0; j < KV; ++j)
    for (int64_t r = 0; r < R; ++r) {
      auto part = [&](int64_t b) { return part_at(parts + (j * blocks + b) * width, R, D); };
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t b = 0; b < blocks; ++b)
        if (part(b).l[r] > 0.f) M = std::max(M, part(b).m[r]);
      const int64_t g = r / S, i = r % S;
      float* y = Y + i * H * D + (j * G + g) * D;
      std::fill(y, y + D, 0.f);
      float den = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const Part p = part(b);
        if (!(p.l[r] > 0.f)) continue;
        const float c = std::exp(p.m[r] - M);
        den += c * p.l[r];
        const float* a = p.a + r * D;
        for (int64_t d = 0; d < D; ++d) y[d] += c * a[d];
      }
      const float inv = 1.f / den;
      for (int64_t d = 0; d < D; ++d) y[d] *= inv;
    }
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(edgeadapt, "cache_attention.out", cache_attention_out);
