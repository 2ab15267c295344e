// CUDA twin of src/match.c: one block per detection; the block L2-normalises its vector in shared memory,
// threads take prototypes j = tid, tid + blockDim, ... (conditional: same class only), and a block
// reduction keeps the best (first index on ties; any NaN -> idx -1, sim NaN; nothing eligible -> -1, -inf).
#include <math.h>

#include "common.cuh"

#define THREADS 256

struct Best {
    float v;
    int idx;  // -1: nothing eligible seen
    int nan;
};

__device__ __forceinline__ Best better(Best a, Best b) {  // a precedes b in prototype order when tied
    Best r;
    r.nan = a.nan | b.nan;
    bool take_b = b.idx >= 0 && (a.idx < 0 || b.v > a.v || (b.v == a.v && b.idx < a.idx));
    r.v = take_b ? b.v : a.v;
    r.idx = take_b ? b.idx : a.idx;
    return r;
}

__global__ void k_match(const float *__restrict__ vec, int d, const int64_t *__restrict__ det_cls,
                        const float *__restrict__ protos, int m, const int64_t *__restrict__ proto_cls, int cond,
                        float threshold, int64_t *__restrict__ idx, float *__restrict__ sim,
                        int64_t *__restrict__ identity) {
    extern __shared__ float v[];
    __shared__ double part[THREADS];
    __shared__ Best bests[THREADS];
    const int i = blockIdx.x, t = threadIdx.x;
    const float *x = vec + (size_t)i * d;
    double s = 0.0;
    for (int k = t; k < d; k += THREADS) s += (double)x[k] * x[k];
    part[t] = s;
    __syncthreads();
    for (int h = THREADS / 2; h > 0; h >>= 1) {
        if (t < h) part[t] += part[t + h];
        __syncthreads();
    }
    float nrm = (float)sqrt(part[0]);
    if (!(nrm >= 1e-12f) && nrm == nrm) nrm = 1e-12f;
    for (int k = t; k < d; k += THREADS) v[k] = x[k] / nrm;
    __syncthreads();
    const int64_t c = cond ? det_cls[i] : 0;
    Best b = {-INFINITY, -1, 0};
    for (int j = t; j < m; j += THREADS) {
        if (cond && proto_cls[j] != c) continue;
        const float *p = protos + (size_t)j * d;
        float acc = 0.f;
        for (int k = 0; k < d; k++) acc = fmaf(v[k], p[k], acc);
        if (acc != acc)
            b.nan = 1;
        else if (b.idx < 0 || acc > b.v)
            b.v = acc, b.idx = j;
    }
    bests[t] = b;
    __syncthreads();
    for (int h = THREADS / 2; h > 0; h >>= 1) {
        if (t < h) bests[t] = better(bests[t], bests[t + h]);
        __syncthreads();
    }
    if (t == 0) {
        Best r = bests[0];
        int64_t id;
        float sv;
        if (r.nan)
            id = -1, sv = NAN;
        else
            id = isfinite(r.v) ? r.idx : -1, sv = r.v;
        idx[i] = id;
        sim[i] = sv;
        if (identity) identity[i] = id >= 0 && sv >= threshold ? id : -1;
    }
}

extern "C" MRT_API int mrt_cuda_match(const float *vectors, int n, int d, const int64_t *det_cls,
                                      const float *prototypes, int m, const int64_t *proto_cls, int mode,
                                      float threshold, int64_t *idx, float *sim, int64_t *identity, void *stream) {
    MRT_CUDA_CHECK_ARG(n >= 0 && m >= 0 && d >= 1, "bad sizes n=%d m=%d d=%d", n, m, d);
    MRT_CUDA_CHECK_ARG(mode == MRT_MATCH_CONDITIONAL || mode == MRT_MATCH_GLOBAL, "matching mode %d unknown", mode);
    MRT_CUDA_CHECK_ARG(n == 0 || (vectors && idx && sim), "null pointer argument");
    MRT_CUDA_CHECK_ARG(m == 0 || prototypes, "null prototypes");
    MRT_CUDA_CHECK_ARG(mode == MRT_MATCH_GLOBAL || n == 0 || m == 0 || (det_cls && proto_cls), "null class arrays");
    MRT_CUDA_CHECK_ARG((size_t)d * sizeof(float) <= 40 * 1024, "vector size %d too large (max 10240)", d);
    if (n == 0) return MRT_OK;
    k_match<<<n, THREADS, sizeof(float) * d, (cudaStream_t)stream>>>(
        vectors, d, det_cls, prototypes, m, proto_cls, mode == MRT_MATCH_CONDITIONAL, threshold, idx, sim, identity);
    MRT_LAUNCHED();
    return MRT_OK;
}
