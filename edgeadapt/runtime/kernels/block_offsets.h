// edgeadapt.BlockOffsets — the offset term of the affine int4 grid (edgeadapt/format/quant.py,
// `int4-affine`; edgeadapt/export/onnx_quant.py writes it) for every quantized MatMul that
// reads one x, in one node:
//
//     y_i[m, n] = part_i[m, n] + sum_b S[m, b] * o_i[b, n]
//     S[m, b]   = sum_{c in block b} x[m, c]          (blocks of G = K / B_i input columns)
//
// BlockOffsets(x, part_1, o_1, part_2, o_2, ...) -> y_1, y_2, ...: x (..., K); part_i
// (..., N_i), the codes' part x @ W'_i^T (a MatMulNBits or edgeadapt's kernel); o_i (B_i, N_i),
// the constant offsets transposed. The exported graph computes the same with a MatMul for S
// (once per x), and a MatMul and an Add per reader, 2 n + 1 nodes where this is one
// (edgeadapt/graphs/offsets.py rewrites them at load). The sums of x are taken in float, as the
// graph's MatMul does; no activation is quantized.
//
// The work is small (B_i is K / 32): per chunk of ROWS rows of x, S is summed once per
// distinct B, and each row of o_i (N_i floats, in L1) is added, scaled, to every output row of
// the chunk (axpys the compiler vectorises), so o_i is read once per chunk, not once per row.
// Chunks are split over ONNX Runtime's threadpool when there is more than one.

#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "ort_kernel.h"

namespace block_offsets {

// what one call does: x (M, K) and its pairs
struct Call {
  const float* x;
  int64_t M, K;
  std::vector<const float*> part, o;
  std::vector<float*> y;
  std::vector<int64_t> N, B;
};

constexpr int64_t ROWS = 16;  // rows of x per parallel item

// rows [m0, m1) (at most ROWS) of every output of the call: the block sums of the rows once
// per distinct B, then per pair and block one row of o (N floats, in L1) added to every row
inline void run_rows(const Call& c, int64_t m0, int64_t m1) {
  const int64_t rows = m1 - m0;
  std::vector<float> sums;
  int64_t summed = 0;  // the B that sums holds (0: none yet)
  for (size_t i = 0; i < c.y.size(); ++i) {
    const int64_t B = c.B[i], N = c.N[i], G = c.K / B;
    if (summed != B) {
      sums.assign(static_cast<size_t>(rows * B), 0.0f);
      for (int64_t r = 0; r < rows; ++r) {
        const float* xm = c.x + (m0 + r) * c.K;
        for (int64_t b = 0; b < B; ++b) {
          float s = 0.0f;
          for (int64_t j = 0; j < G; ++j) s += xm[b * G + j];
          sums[r * B + b] = s;
        }
      }
      summed = B;
    }
    float* y = c.y[i] + m0 * N;
    std::memcpy(y, c.part[i] + m0 * N, static_cast<size_t>(rows * N) * sizeof(float));
    for (int64_t b = 0; b < B; ++b) {
      const float* __restrict ob = c.o[i] + b * N;
      for (int64_t r = 0; r < rows; ++r) {
        const float s = sums[r * B + b];
        float* __restrict ym = y + r * N;
        for (int64_t n = 0; n < N; ++n) ym[n] += s * ob[n];
      }
    }
  }
}

inline void run_item(void* data, size_t item) {
  const Call& c = *static_cast<const Call*>(data);
  const int64_t m0 = static_cast<int64_t>(item) * ROWS;
  run_rows(c, m0, std::min(c.M, m0 + ROWS));
}

constexpr const char* SHAPES =
    "edgeadapt.BlockOffsets: need x (..., K) and pairs of part (..., N) and offsets (B, N), "
    "B dividing K";

struct Kernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return ort_kernel::status_of([&]() -> OrtStatusPtr {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue xv = ctx.GetInput(0);
      const std::vector<int64_t> xs = xv.GetTensorTypeAndShapeInfo().GetShape();
      const size_t pairs = (ctx.GetInputCount() - 1) / 2;
      if (xs.empty() || pairs * 2 + 1 != ctx.GetInputCount())
        return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, SHAPES);
      Call c{xv.GetTensorData<float>(), ort_kernel::leading_rows(xs), xs.back(), {}, {}, {}, {},
             {}};
      for (size_t i = 0; i < pairs; ++i) {
        const Ort::ConstValue pv = ctx.GetInput(1 + 2 * i), ov = ctx.GetInput(2 + 2 * i);
        const std::vector<int64_t> ps = pv.GetTensorTypeAndShapeInfo().GetShape();
        const std::vector<int64_t> os = ov.GetTensorTypeAndShapeInfo().GetShape();
        const bool rows_match =
            ps.size() == xs.size() && std::equal(xs.begin(), xs.end() - 1, ps.begin());
        if (!rows_match || os.size() != 2 || os[1] != ps.back() || os[0] < 1 || c.K % os[0])
          return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, SHAPES);
        c.part.push_back(pv.GetTensorData<float>());
        c.o.push_back(ov.GetTensorData<float>());
        c.N.push_back(os[1]);
        c.B.push_back(os[0]);
        c.y.push_back(ctx.GetOutput(i, ps).GetTensorMutableData<float>());
      }
      if (c.M == 0) return nullptr;
      const size_t items = static_cast<size_t>((c.M + ROWS - 1) / ROWS);
      if (items == 1)
        run_rows(c, 0, c.M);  // one token: too little work to wake the threads for
      else
        ctx.ParallelFor(run_item, items, 0, &c);
      return nullptr;
    });
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new Kernel();
    return nullptr;
  }
  const char* GetName() const { return "BlockOffsets"; }
  // x, then (part, offsets) pairs (variadic, all float), one output per pair
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 1 ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
  }
  bool GetVariadicInputHomogeneity() const { return true; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return INPUT_OUTPUT_VARIADIC;
  }
};

}  // namespace block_offsets
