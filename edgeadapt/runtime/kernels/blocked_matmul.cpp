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
//   reading 32 rows (4 KB) ahead with software prefetches;
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
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "block_offsets.h"
#include "ort_kernel.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BW = 32;  // columns per block (the layout's)
constexpr int MR = 12;      // rows per tile
constexpr int64_t MC = 96;  // rows per chunk: 96 * K floats of x (221 KB at K = 576)
constexpr int64_t PREFETCH = 32;  // rows a one-token block is read ahead of its use

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
    // rows 32 ahead (4 KB, the next page, where the hardware prefetcher stops); every other
    // row is enough, the prefetcher takes the neighbours
    _mm_prefetch(reinterpret_cast<const char*>(w + (c + PREFETCH) * BW), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (c + PREFETCH) * BW + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (c + PREFETCH + 2) * BW), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (c + PREFETCH + 2) * BW + 16), _MM_HINT_T0);
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

template <int... Rs>
void tile_rows(int rows, const float* x, const float* w, float* y, int64_t K, int64_t ldy,
               std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? (tile<Rs + 1>(x, w, y, K, ldy), 0) : 0), ...);
}

struct Job {
  const float* x;
  const float* w;    // float weight, or
  const uint8_t* q;  // codes (int8 one per byte, or int4 two per byte) with
  const float* s;    // their scales, G input columns per scale
  float* y;
  int64_t M, K, N, blocks, chunks, G;
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
};
template <>
struct Names<Form::Int8> {
  static constexpr const char* op = "QBlockedMatMul";
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  static constexpr const char* shapes =
      "edgeadapt.QBlockedMatMul: need x (..., K) and codes (N/32, K, 32) with the same K";
  static constexpr const char* scales =
      "edgeadapt.QBlockedMatMul: need scales (N/32, K/G, 32) for codes (N/32, K, 32)";
};
template <>
struct Names<Form::Int4> {
  static constexpr const char* op = "Q4BlockedMatMul";
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  static constexpr const char* shapes =
      "edgeadapt.Q4BlockedMatMul: need x (..., K) and packed codes (N/32, K, 16) with the same K";
  static constexpr const char* scales =
      "edgeadapt.Q4BlockedMatMul: need scales (N/32, K/G, 32) for packed codes (N/32, K, 16)";
};

template <Form F>
struct Kernel {
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
      ctx.ParallelFor(run_item<F>, all.first.back(), 0, &all);
      return nullptr;
    });
  }
};

template <Form F>
struct Op : Ort::CustomOpBase<Op<F>, Kernel<F>, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new Kernel<F>();
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
