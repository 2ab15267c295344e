// Shared by the CUDA twins: error reporting (same mrt_last_error contract as the C library) and helpers.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "mocha_rt.h"

int mrt_cuda_fail(int code, const char *file, int line, const char *fmt, ...);

#define MRT_CUDA_FAIL(code, ...) mrt_cuda_fail((code), __FILE__, __LINE__, __VA_ARGS__)
#define MRT_CUDA_CHECK_ARG(cond, ...)                                   \
    do {                                                                \
        if (!(cond)) return MRT_CUDA_FAIL(MRT_EINVAL, __VA_ARGS__);     \
    } while (0)
// Any CUDA runtime error (including a failed launch) becomes MRT_ECUDA with the expression and file:line.
#define MRT_CUDA(expr)                                                                                 \
    do {                                                                                               \
        cudaError_t e_ = (expr);                                                                       \
        if (e_ != cudaSuccess)                                                                         \
            return MRT_CUDA_FAIL(MRT_ECUDA, "%s: %s (%s)", #expr, cudaGetErrorString(e_), cudaGetErrorName(e_)); \
    } while (0)
#define MRT_LAUNCHED() MRT_CUDA(cudaGetLastError())

static inline unsigned mrt_blocks(long n, int threads) { return (unsigned)((n + threads - 1) / threads); }
