// nGPT weight retraction (arXiv 2410.01131, section 2.1): normalise many tensors in place, one launch.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace torchext {

// A block normalises one contiguous row, or this many adjacent columns of a strided axis.
constexpr int kRenormalizeColumnsPerBlock = 32;

// table: device array [num_tensors, 6] of int64 rows (data pointer, outer, n, inner, dtype code, first block):
// tensor i is seen as [outer, n, inner] and normalised along n. Its blocks are first_block .. the next
// tensor's first_block - 1: `outer` of them when inner == 1, else outer * ceil(inner / 32).
// zero_counts: device int32 [num_tensors], incremented once per vector whose norm is 0.
cudaError_t renormalize(const int64_t* table, int num_tensors, int64_t num_blocks, int32_t* zero_counts, float eps,
                        cudaStream_t stream);

}  // namespace torchext
