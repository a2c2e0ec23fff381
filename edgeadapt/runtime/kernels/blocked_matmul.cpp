// edgeadapt.BlockedMatMul — an ONNX Runtime custom op for a linear whose weight is a live
// (graph input, edited in place) buffer in the blocked32 layout (edgeadapt/format/layout.py):
//
//     y[m, 32 b + j] = sum_c x[m, c] * w[b, c, j]     x (..., K), w (N/32, K, 32), y (..., N)
//
// Why: every MLAS GEMM whose B operand is not a constant copies each B panel before it
// multiplies (docs/bench.md), so a live weight read by MatMul costs about 1.19x a packed
// constant at 64 tokens. blocked32 already is a packed-B layout (each 32-column block a
// contiguous K x 32 run), so this kernel reads it in place and packs nothing:
//
// - one token (M == 1): per block, stream w[b] with eight accumulators (FMA latency), sum;
// - more tokens: 12-row x 32-column tiles, 24 accumulators: per c, two 16-float loads of
//   w[b, c, :] and one broadcast of x[m, c] per row (AVX-512; plain C++ elsewhere). Rows are
//   taken in chunks of MC (the chunk of x stays in L2 while every block passes over it); the
//   (chunk, block) pairs are split over ONNX Runtime's intra-op threadpool.
//
// Built against ONNX Runtime's C/C++ API headers (scripts/ort_headers.py installs them) and
// loaded with SessionOptions.register_custom_ops_library: edgeadapt/runtime/onnxruntime_kernel.py.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BW = 32;  // columns per block (the layout's)
constexpr int MR = 12;      // rows per tile
constexpr int64_t MC = 96;  // rows per chunk: 96 * K floats of x (221 KB at K = 576)

// y[n0 + j] = sum_c x[c] w[c, j], j < 32, for one block w (K, 32)
void gemv_block(const float* __restrict x, const float* __restrict w, float* __restrict y,
                int64_t K) {
#if defined(__AVX512F__)
  __m512 a[4], b[4];
  for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 4 <= K; c += 4)
    for (int i = 0; i < 4; ++i) {
      const __m512 s = _mm512_set1_ps(x[c + i]);
      a[i] = _mm512_fmadd_ps(s, _mm512_loadu_ps(w + (c + i) * BW), a[i]);
      b[i] = _mm512_fmadd_ps(s, _mm512_loadu_ps(w + (c + i) * BW + 16), b[i]);
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

template <int... Rs>
void tile_rows(int rows, const float* x, const float* w, float* y, int64_t K, int64_t ldy,
               std::integer_sequence<int, Rs...>) {
  ((rows == Rs + 1 ? (tile<Rs + 1>(x, w, y, K, ldy), 0) : 0), ...);
}

struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, blocks, chunks;
};

// one (chunk, block) pair: rows [MC q, MC q + MC) of x times block b of w
void run_item(void* data, size_t item) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t q = static_cast<int64_t>(item) / j.blocks, b = static_cast<int64_t>(item) % j.blocks;
  const float* w = j.w + b * j.K * BW;
  if (j.M == 1) {
    gemv_block(j.x, w, j.y + b * BW, j.K);
    return;
  }
  const int64_t m1 = std::min(j.M, (q + 1) * MC);
  for (int64_t m = q * MC; m < m1; m += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, m1 - m));
    tile_rows(rows, j.x + m * j.K, w, j.y + m * j.N + b * BW, j.K, j.N,
              std::make_integer_sequence<int, MR>{});
  }
}

struct Kernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue xv = ctx.GetInput(0), wv = ctx.GetInput(1);
      const std::vector<int64_t> xs = xv.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> ws = wv.GetTensorTypeAndShapeInfo().GetShape();
      if (xs.empty() || ws.size() != 3 || ws[2] != BW || ws[1] != xs.back())
        return Ort::GetApi().CreateStatus(
            ORT_INVALID_ARGUMENT,
            "edgeadapt.BlockedMatMul: need x (..., K) and w (N/32, K, 32) with the same K");
      Job job{xv.GetTensorData<float>(), wv.GetTensorData<float>(), nullptr, 1, ws[1],
              ws[0] * BW, ws[0], 1};
      std::vector<int64_t> ys(xs);
      ys.back() = job.N;
      for (size_t i = 0; i + 1 < xs.size(); ++i) job.M *= xs[i];
      job.y = ctx.GetOutput(0, ys).GetTensorMutableData<float>();
      if (job.M == 0 || job.N == 0) return nullptr;
      job.chunks = (job.M + MC - 1) / MC;
      const size_t items = static_cast<size_t>(job.chunks * job.blocks);
      ctx.ParallelFor(run_item, items, 0, &job);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new Kernel();
    return nullptr;
  }
  const char* GetName() const { return "BlockedMatMul"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

std::mutex domains_lock;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;  // live as long as the library
Op the_op;

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
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> guard(domains_lock);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
