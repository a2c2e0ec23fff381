// What edgeadapt's ONNX Runtime custom ops (blocked_matmul.cpp, block_offsets.h) share: the rows
// of an input and the turning of a kernel body's exceptions into ONNX Runtime's status.
// Include it after onnxruntime_cxx_api.h.

#pragma once

#include <cstdint>
#include <exception>
#include <vector>

namespace ort_kernel {

// The rows of an input of shape (..., K): the product of its leading dimensions.
inline int64_t leading_rows(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

// body(), with ONNX Runtime's and the standard exceptions it throws returned as a status.
template <class Body>
OrtStatusPtr status_of(Body&& body) {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

}  // namespace ort_kernel
