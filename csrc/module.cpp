// torchext._C: the CUDA C++ kernels as a pybind11 module. It links only the CUDA runtime (static), never
// libtorch, so it survives torch upgrades. Python passes data pointers, sizes and the stream to launch on.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

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
}
