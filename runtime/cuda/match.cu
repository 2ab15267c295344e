// CUDA twin of src/match.c: one block per detection; the block L2-normalises its vector in shared memory
// (centring: subtracts its class mean row and normalises again; projection: y = l2n(v @ proj), threads over
// the output columns, y in shared memory after v), threads take prototypes j = tid,
// tid + blockDim, ... (conditional: same class only), and a block reduction keeps the best (first index on
// ties; any NaN -> idx -1, sim NaN; nothing eligible -> -1, -inf); identity by the scalar threshold or the
// winner's own threshold; then the "not NAME" corrections of that identity (threads over its CSR rows) refuse
// it when one is strictly nearer than its prototype (both dot products by the same serial fmaf loop).
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

// max(sqrt(sum over the block of s), 1e-12) (NaN kept); every thread of the block must call it.
__device__ float block_norm(double s, double *part) {
    const int t = threadIdx.x;
    part[t] = s;
    __syncthreads();
    for (int h = THREADS / 2; h > 0; h >>= 1) {
        if (t < h) part[t] += part[t + h];
        __syncthreads();
    }
    float nrm = (float)sqrt(part[0]);
    __syncthreads();  // part is free again
    if (!(nrm >= 1e-12f) && nrm == nrm) nrm = 1e-12f;
    return nrm;
}

__global__ void k_match(const float *__restrict__ vec, int d, const int64_t *__restrict__ det_cls,
                        const float *__restrict__ protos, int m, const int64_t *__restrict__ proto_cls, int cond,
                        const float *__restrict__ means, int n_means, const float *__restrict__ proj, int d_out,
                        const float *__restrict__ thresholds, float threshold,
                        const float *__restrict__ negatives, const int32_t *__restrict__ neg_offsets,
                        int64_t *__restrict__ idx, float *__restrict__ sim, int64_t *__restrict__ identity) {
    extern __shared__ float v[];  // d floats (+ d_out with a projection)
    __shared__ double part[THREADS];
    __shared__ Best bests[THREADS];
    __shared__ int chosen, refused;  // the identity after the threshold (-1: none); a correction refused it
    __shared__ float own;            // its cosine, as the serial loop below computed it
    const int i = blockIdx.x, t = threadIdx.x;
    const float *x = vec + (size_t)i * d;
    double s = 0.0;
    for (int k = t; k < d; k += THREADS) s += (double)x[k] * x[k];
    const float nrm = block_norm(s, part);
    for (int k = t; k < d; k += THREADS) v[k] = x[k] / nrm;  // each thread keeps its own k: no sync needed
    if (n_means > 0) {  // vector centring (block-uniform branch)
        const int64_t r = n_means > 1 ? det_cls[i] : 0;
        if (r < 0 || r >= n_means) {  // class without a mean: reported as "not finite"
            if (t == 0) idx[i] = -1, sim[i] = NAN;
            if (t == 0 && identity) identity[i] = -1;
            return;
        }
        const float *mu = means + (size_t)r * d;
        s = 0.0;
        for (int k = t; k < d; k += THREADS) {
            const float y = v[k] - mu[k];
            v[k] = y;
            s += (double)y * y;
        }
        const float nrm2 = block_norm(s, part);
        for (int k = t; k < d; k += THREADS) v[k] = v[k] / nrm2;
    }
    __syncthreads();
    const float *w = v;  // the vector matched (dd entries)
    int dd = d;
    if (proj) {  // linear projection (block-uniform branch): y = l2n(v @ proj), threads over output columns
        float *y = v + d;
        s = 0.0;
        for (int j = t; j < d_out; j += THREADS) {
            float acc = 0.f;
            for (int k = 0; k < d; k++) acc = fmaf(v[k], proj[(size_t)k * d_out + j], acc);
            y[j] = acc;
            s += (double)acc * acc;
        }
        const float nrm3 = block_norm(s, part);
        for (int j = t; j < d_out; j += THREADS) y[j] = y[j] / nrm3;
        __syncthreads();
        w = y, dd = d_out;
    }
    const int64_t c = cond ? det_cls[i] : 0;
    Best b = {-INFINITY, -1, 0};
    for (int j = t; j < m; j += THREADS) {
        if (cond && proto_cls[j] != c) continue;
        const float *p = protos + (size_t)j * dd;
        float acc = 0.f;
        for (int k = 0; k < dd; k++) acc = fmaf(w[k], p[k], acc);
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
        const float thr = id >= 0 && thresholds ? thresholds[id] : threshold;
        chosen = identity && id >= 0 && sv >= thr ? (int)id : -1;
        own = sv;
        refused = 0;
    }
    __syncthreads();
    if (chosen >= 0 && negatives) {  // block-uniform: its identity's corrections, threads over the rows
        for (int k = neg_offsets[chosen] + t; k < neg_offsets[chosen + 1]; k += THREADS) {
            const float *q = negatives + (size_t)k * dd;
            float acc = 0.f;
            for (int e = 0; e < dd; e++) acc = fmaf(w[e], q[e], acc);
            if (acc > own) refused = 1;  // any thread may set it: the same value
        }
        __syncthreads();
    }
    if (t == 0 && identity) identity[i] = chosen >= 0 && !refused ? chosen : -1;
}

extern "C" MRT_API int mrt_cuda_match(const float *vectors, int n, int d, const int64_t *det_cls,
                                      const float *prototypes, int m, const int64_t *proto_cls, int mode,
                                      const float *means, int n_means, const float *proj, int d_out,
                                      const float *thresholds, float threshold, const float *negatives,
                                      const int32_t *neg_offsets, int64_t *idx, float *sim, int64_t *identity,
                                      void *stream) {
    MRT_CUDA_CHECK_ARG(n >= 0 && m >= 0 && d >= 1, "bad sizes n=%d m=%d d=%d", n, m, d);
    MRT_CUDA_CHECK_ARG(mode == MRT_MATCH_CONDITIONAL || mode == MRT_MATCH_GLOBAL, "matching mode %d unknown", mode);
    MRT_CUDA_CHECK_ARG(n == 0 || (vectors && idx && sim), "null pointer argument");
    MRT_CUDA_CHECK_ARG(m == 0 || prototypes, "null prototypes");
    MRT_CUDA_CHECK_ARG(mode == MRT_MATCH_GLOBAL || n == 0 || m == 0 || (det_cls && proto_cls), "null class arrays");
    MRT_CUDA_CHECK_ARG(n_means >= 0 && (n_means == 0 || means), "bad vector centring means (n_means=%d)", n_means);
    const int centre = means && n_means > 0 && m > 0;  // nothing to match: the reference skips centring
    MRT_CUDA_CHECK_ARG(!centre || n_means == 1 || n == 0 || det_cls, "null class array (per-class means)");
    MRT_CUDA_CHECK_ARG(!proj || d_out >= 1, "bad projection output size d_out=%d", d_out);
    MRT_CUDA_CHECK_ARG(!negatives || neg_offsets, "corrections without their offsets");
    const size_t floats = (size_t)d + (proj ? (size_t)d_out : 0);
    MRT_CUDA_CHECK_ARG(floats * sizeof(float) <= 40 * 1024,
                       "vector size %d (+ projection %d) too large (max 10240 in all)", d, proj ? d_out : 0);
    if (n == 0) return MRT_OK;
    k_match<<<n, THREADS, sizeof(float) * floats, (cudaStream_t)stream>>>(
        vectors, d, det_cls, prototypes, m, proto_cls, mode == MRT_MATCH_CONDITIONAL, means, centre ? n_means : 0,
        proj, proj ? d_out : 0, thresholds, threshold, negatives, negatives ? neg_offsets : NULL, idx, sim, identity);
    MRT_LAUNCHED();
    return MRT_OK;
}
