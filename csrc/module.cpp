// torchext._C: the CUDA C++ kernels as a pybind11 module. It links only the CUDA runtime (static), never
// libtorch, so it survives torch upgrades. Python passes data pointers, sizes and the stream to launch on.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "gram_iteration/gram_iteration.h"
#include "int8_matmul/vectorwise_quant.h"
#include "ngpt/renormalize.h"

namespace py = pybind11;

namespace {

void check(cudaError_t error, const char* op) {
  if (error != cudaSuccess) throw std::runtime_error(std::string(op) + ": " + cudaGetErrorString(error));
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchext CUDA C++ kernels (see csrc/)";
  m.attr("FLOAT32") = static_cast<int64_t>(torchext::kFloat32);
  m.attr("BFLOAT16") = static_cast<int64_t>(torchext::kBFloat16);
  m.attr("FLOAT16") = static_cast<int64_t>(torchext::kFloat16);
  m.attr("RENORMALIZE_COLUMNS_PER_BLOCK") = torchext::kRenormalizeColumnsPerBlock;

  m.def("cuda_runtime_version", [] {
    int version = 0;
    check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
    return version;
  });

  m.def(
      "renormalize",
      [](std::uintptr_t table, int num_tensors, int64_t num_blocks, std::uintptr_t zero_counts, float eps,
         std::uintptr_t stream) {
        check(torchext::renormalize(as_ptr<const int64_t>(table), num_tensors, num_blocks,
                                    as_ptr<int32_t>(zero_counts), eps, as_ptr<CUstream_st>(stream)),
              "renormalize");
      },
      py::arg("table"), py::arg("num_tensors"), py::arg("num_blocks"), py::arg("zero_counts"), py::arg("eps"),
      py::arg("stream"), "Normalise every tensor of a device table in place (see csrc/ngpt/renormalize.h).");

  m.def(
      "int8_vectorwise_quant",
      [](std::uintptr_t x, int64_t dtype, int64_t rows, int64_t cols, int64_t row_stride, float threshold,
         std::uintptr_t excluded_cols, std::uintptr_t codes, std::uintptr_t row_scale, std::uintptr_t outlier_mask,
         std::uintptr_t outlier_cols, std::uintptr_t n_outliers, int64_t capacity, std::uintptr_t stream) {
        check(torchext::int8_vectorwise_quant(as_ptr<const void>(x), dtype, rows, cols, row_stride, threshold,
                                              as_ptr<const uint8_t>(excluded_cols), as_ptr<int8_t>(codes),
                                              as_ptr<float>(row_scale), as_ptr<uint8_t>(outlier_mask),
                                              as_ptr<int32_t>(outlier_cols), as_ptr<int32_t>(n_outliers), capacity,
                                              as_ptr<CUstream_st>(stream)),
              "int8_vectorwise_quant");
      },
      py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("threshold"),
      py::arg("excluded_cols"), py::arg("codes"), py::arg("row_scale"), py::arg("outlier_mask"),
      py::arg("outlier_cols"), py::arg("n_outliers"), py::arg("capacity"), py::arg("stream"),
      "LLM.int8() row quantization of x [rows, cols] (dtype FLOAT32/BFLOAT16/FLOAT16, unit column stride) into int8 "
      "codes [rows, cols] and fp32 row_scale [rows], with the outlier columns (|x| >= threshold > 0) listed "
      "ascending in outlier_cols [capacity] (-1 padded) and counted in n_outliers [1]; excluded_cols is a uint8 "
      "[cols] device pointer or 0; outlier_mask [cols] uint8 is scratch. Buffers are device addresses, stream a "
      "cudaStream_t; nothing is synchronised (see csrc/int8_matmul/vectorwise_quant.h).");

  m.attr("GRAM_MAX_SIDE") = torchext::kGramMaxSide;
  m.def(
      "gram_iteration",
      [](std::uintptr_t w, bool is_complex, int64_t batch, int64_t rows, int64_t cols, int n_iter,
         std::uintptr_t upper, std::uintptr_t lower, std::uintptr_t stream) {
        check(torchext::gram_iteration(as_ptr<const void>(w), is_complex, batch, rows, cols, n_iter,
                                       as_ptr<float>(upper), as_ptr<float>(lower), as_ptr<CUstream_st>(stream)),
              "gram_iteration");
      },
      py::arg("w"), py::arg("is_complex"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("n_iter"),
      py::arg("upper"), py::arg("lower"), py::arg("stream"),
      "Gram-iteration upper and lower bounds on sigma_max of batch matrices [rows, cols] (rows >= cols, both <= "
      "GRAM_MAX_SIDE; fp32 or complex64), one block each (see csrc/gram_iteration/gram_iteration.h).");
}
