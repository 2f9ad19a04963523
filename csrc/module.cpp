// torchext._C: the CUDA C++ kernels as a pybind11 module. It links only the CUDA runtime (static), never
// libtorch, so it survives torch upgrades. Python passes data pointers, sizes and the stream to launch on.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "gram_iteration/gram_iteration.h"
#include "int8_matmul/vectorwise_quant.h"
#include "kv_quant/append.h"
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

  m.attr("KV_QUANT_MAX_HEAD_DIM") = torchext::kKvQuantMaxHeadDim;
  m.def(
      "kv_quant_append",
      [](std::uintptr_t k, std::uintptr_t v, const py::tuple& k_strides, const py::tuple& v_strides,
         std::uintptr_t counts, std::uintptr_t lengths, std::uintptr_t key_codes, std::uintptr_t key_outlier_index,
         std::uintptr_t key_outlier_value, std::uintptr_t value_codes, std::uintptr_t value_offset,
         std::uintptr_t value_scale, std::uintptr_t value_outlier_index, std::uintptr_t value_outlier_value,
         std::uintptr_t sink_keys, std::uintptr_t sink_values, std::uintptr_t window_keys,
         std::uintptr_t window_values, std::uintptr_t key_boundaries, std::uintptr_t value_boundaries,
         std::uintptr_t key_offset, std::uintptr_t key_scale, int64_t batch, int64_t kv_heads, int64_t n_new,
         int64_t head_dim, int64_t capacity, int64_t slots, int64_t sink, int64_t window, int64_t key_bits,
         int64_t value_bits, int64_t dtype, std::uintptr_t stream) {
        auto strides = [](const py::tuple& t, const char* name) {
          if (t.size() != 3) throw py::value_error(std::string("kv_quant_append: ") + name + " needs 3 strides");
          return torchext::KvQuantStrides{t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>()};
        };
        const torchext::KvQuantStorage storage{
            as_ptr<int32_t>(key_codes),         as_ptr<int16_t>(key_outlier_index), as_ptr<void>(key_outlier_value),
            as_ptr<int32_t>(value_codes),       as_ptr<void>(value_offset),         as_ptr<void>(value_scale),
            as_ptr<int16_t>(value_outlier_index), as_ptr<void>(value_outlier_value), as_ptr<void>(sink_keys),
            as_ptr<void>(sink_values),          as_ptr<void>(window_keys),          as_ptr<void>(window_values)};
        const torchext::KvQuantCodebook codebook{as_ptr<const float>(key_boundaries),
                                                 as_ptr<const float>(value_boundaries), as_ptr<const float>(key_offset),
                                                 as_ptr<const float>(key_scale), key_bits, value_bits};
        const torchext::KvQuantShape shape{batch, kv_heads, n_new, head_dim, capacity, slots, sink, window};
        check(torchext::kv_quant_append(as_ptr<const void>(k), as_ptr<const void>(v), strides(k_strides, "k_strides"),
                                        strides(v_strides, "v_strides"), as_ptr<const int32_t>(counts),
                                        as_ptr<int32_t>(lengths), storage, codebook, shape, dtype,
                                        as_ptr<CUstream_st>(stream)),
              "kv_quant_append");
      },
      py::arg("k"), py::arg("v"), py::arg("k_strides"), py::arg("v_strides"), py::arg("counts"), py::arg("lengths"),
      py::arg("key_codes"), py::arg("key_outlier_index"), py::arg("key_outlier_value"), py::arg("value_codes"),
      py::arg("value_offset"), py::arg("value_scale"), py::arg("value_outlier_index"),
      py::arg("value_outlier_value"), py::arg("sink_keys"), py::arg("sink_values"), py::arg("window_keys"),
      py::arg("window_values"), py::arg("key_boundaries"), py::arg("value_boundaries"), py::arg("key_offset"),
      py::arg("key_scale"), py::arg("batch"), py::arg("kv_heads"), py::arg("n_new"), py::arg("head_dim"),
      py::arg("capacity"), py::arg("slots"), py::arg("sink"), py::arg("window"), py::arg("key_bits"),
      py::arg("value_bits"), py::arg("dtype"), py::arg("stream"),
      "KVQuant quantize-and-append: sequence b takes the first counts[b] tokens of k, v [batch, kv_heads, n_new, "
      "head_dim] (dtype FLOAT32/BFLOAT16/FLOAT16, strides (batch, head, token) in elements, last stride 1) into the "
      "sink, the recent-window ring buffer and the packed dense-and-sparse buffers of "
      "torchext/reference/kv_quant.py::Storage (contiguous device addresses; counts, lengths int32 [batch], "
      "lengths advanced in place; a sequence past capacity is left untouched). Codebook arrays are fp32. "
      "Nothing is synchronised or allocated (see csrc/kv_quant/append.h).");
}
