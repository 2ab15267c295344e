/* Internal helpers shared by the portable C files (not part of the ABI). */
#ifndef MRT_INTERNAL_H
#define MRT_INTERNAL_H

#include <stdint.h>

#include "mocha_rt.h"

/* Record a one-line error "file:line: message" for mrt_last_error() and return `code`. */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
int mrt_fail(int code, const char *file, int line, const char *fmt, ...);
void mrt_clear_error(void);

#define MRT_FAIL(code, ...) mrt_fail((code), __FILE__, __LINE__, __VA_ARGS__)
#define MRT_CHECK(cond, ...)                                   \
    do {                                                       \
        if (!(cond)) return MRT_FAIL(MRT_EINVAL, __VA_ARGS__); \
    } while (0)

/* Worker threads for the big ops: mrt_threads(automatic) is the mrt_set_threads setting, or `automatic`
 * when unset (1..8); mrt_cpus() the online CPUs (<= 8). mrt_parallel runs fn on n jobs (job t at
 * jobs + t * size), job 0 on the calling thread, and joins. */
int mrt_threads(int automatic);
int mrt_cpus(void);
void mrt_parallel(void *(*fn)(void *), void *jobs, size_t size, int n);

/* Hot loops get an AVX2/FMA clone on x86-64 (GCC, ELF ifunc); elsewhere (aarch64: NEON is baseline) the
 * plain -O3 build is used. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define MRT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define MRT_CLONES_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MRT_CLONES
#define MRT_CLONES_AVX512
#endif

/* IEEE binary16 bits of a float (round to nearest even; NaN/inf kept). */
static inline uint16_t mrt_f32_to_f16(float f) {
    union {
        float f;
        uint32_t u;
    } v = {f};
    uint32_t x = v.u, sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
    int exp = (int)((x >> 23) & 0xff);
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    int e = exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        int shift = 14 - e;
        uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (mant >> 13), rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is correct */
    return (uint16_t)(sign | h);
}

#endif
