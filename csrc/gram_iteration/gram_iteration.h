// Gram-iteration spectral-norm bounds (Delattre et al., arXiv 2305.16173) for many small matrices at once.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace torchext {

// The kernel keeps a matrix and its Gram product in shared memory: both sides at most this.
constexpr int kGramMaxSide = 64;

// For each of `batch` matrices W [rows, cols] (contiguous, row-major, rows >= cols, both <= kGramMaxSide; fp32,
// or complex64 as interleaved (re, im) pairs), runs n_iter steps of G <- G^H G / ||G||_F^2 with the scale kept
// in the log domain (fp64), then writes
//   upper[b] = ||G_T||_F^(1/2^T) * exp(L / 2^T)             >= sigma_max(W)  (Schatten-2^(T+1) norm)
//   lower[b] = (||G_T||_F^2 / tr G_T)^(1/2^T) * exp(L / 2^T) <= sigma_max(W)
// Products and sums are IEEE fp32 (FMA, no TF32). An all-zero matrix gives 0 for both. One block per matrix.
cudaError_t gram_iteration(const void* w, bool is_complex, int64_t batch, int64_t rows, int64_t cols, int n_iter,
                           float* upper, float* lower, cudaStream_t stream);

}  // namespace torchext
