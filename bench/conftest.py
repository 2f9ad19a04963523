"""Without CUDA the benchmarks run once as smoke tests, with torchext's Triton kernels on the interpreter."""

from bench._harness import enable_interpreter_without_cuda

enable_interpreter_without_cuda()  # before pytest imports the bench modules, which import triton and torchext
