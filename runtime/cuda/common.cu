// Error string of the CUDA library (thread-local, "file:line: message") and its build facts.
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common.cuh"

#ifndef MRT_CUDA_ARCHS
#define MRT_CUDA_ARCHS "unknown"
#endif

static thread_local char last_error[512];

extern "C" MRT_API const char *mrt_last_error(void) { return last_error; }
extern "C" MRT_API const char *mrt_cuda_archs(void) { return MRT_CUDA_ARCHS; }
extern "C" MRT_API int mrt_abi_version(void) { return MRT_ABI_VERSION; }

int mrt_cuda_fail(int code, const char *file, int line, const char *fmt, ...) {
    const char *base = strrchr(file, '/');
    int k = snprintf(last_error, sizeof last_error, "%s:%d: ", base ? base + 1 : file, line);
    if (k < 0 || (size_t)k >= sizeof last_error) return code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error + k, sizeof last_error - (size_t)k, fmt, ap);
    va_end(ap);
    return code;
}
