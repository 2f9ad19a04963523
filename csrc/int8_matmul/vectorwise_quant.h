// LLM.int8() activation quantization (arXiv 2208.07339, sections 3.2-3.3): per-row absmax int8 codes and the
// outlier input-feature columns, in one read of x and without any host synchronisation.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace torchext {

// Reproduces torchext/reference/int8_matmul.py::int8_vectorwise_quant bit for bit. With v = x[i, j] as fp32
// and "excluded" meaning excluded_cols != nullptr && excluded_cols[j] != 0:
// - absmax_i = max |v| over the columns j that are not excluded, with v finite and (threshold <= 0 or
//   |v| < threshold); 0 when there is none.
// - A row holding a NaN or Inf in any column (excluded or not) is non-finite: row_scale[i] = NaN, codes 0.
//   Otherwise row_scale[i] = absmax_i.
// - codes[i, j] = 0 for excluded columns and non-finite rows; else, with lift = 2^64 for 0 < absmax_i < 2^-64
//   and 1 otherwise (exact scalings, so that 127 / absmax cannot overflow, for subnormal rows too) and
//   inv = absmax_i > 0 ? 127 * (1 / (absmax_i * lift)) : 0 (correctly rounded fp32 operations, a reciprocal
//   then a product, as torch evaluates `127 / absmax`), codes[i, j] = clamp(rint((v * lift) * inv), -127, 127):
//   fp32 products, ties to even. Elements at or above the threshold therefore saturate at +-127 (intended: the
//   outlier correction removes them).
// - Column j is an outlier when threshold > 0, j is not excluded and some row has |v| >= threshold (NaN never
//   is, +-Inf is). outlier_cols gets the outlier columns in ascending order, at most `capacity` of them, and -1
//   in the remaining entries; n_outliers[0] = the number of outlier columns (may exceed capacity).
// The result is deterministic: the row kernel marks outlier_mask[j] (every writer stores the same 1), then a
// one-block kernel compacts the mask in column order. Three launches at most (mask memset, rows, compaction),
// all on `stream`. rows == 0 or cols == 0 is valid (row_scale = 0 when cols == 0; no outliers).
// Returns cudaErrorInvalidValue for negative sizes, an unknown dtype, cols > INT32_MAX or an x not aligned to
// its element size; otherwise the launch status (cudaGetLastError()).
cudaError_t int8_vectorwise_quant(const void* x,                 // [rows, cols] device, row i at x + i * row_stride
                                  int64_t dtype,                 // DtypeCode of x: fp32, bf16 or fp16
                                  int64_t rows,                  // M >= 0
                                  int64_t cols,                  // K >= 0
                                  int64_t row_stride,            // elements between rows; the column stride is 1
                                  float threshold,               // outlier magnitude; <= 0 disables detection
                                  const uint8_t* excluded_cols,  // [cols] or nullptr: columns fixed as outliers in
                                                                 // advance (static mode): out of absmax, code 0
                                  int8_t* codes,                 // [rows, cols] contiguous, output
                                  float* row_scale,              // [rows] output: absmax, NaN for non-finite rows
                                  uint8_t* outlier_mask,         // [cols] scratch; the launcher zeroes it
                                  int32_t* outlier_cols,         // [capacity] output: ascending, -1 padded
                                  int32_t* n_outliers,           // [1] output: the number of outlier columns
                                  int64_t capacity,              // length of outlier_cols, >= 0
                                  cudaStream_t stream);          // every launch goes on this stream

}  // namespace torchext
