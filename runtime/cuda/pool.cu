// CUDA twin of src/pool.c (box-area-mean/v2, per-cell coverage weights, float64 sums): one block per
// (box, level), threads over channels.
#include <math.h>

#include "common.cuh"

#define MAX_LEVELS 8
#define MIN_EXTENT 0.25

struct Maps {
    const float *p[MAX_LEVELS];
    int c[MAX_LEVELS], h[MAX_LEVELS], w[MAX_LEVELS], off[MAX_LEVELS];
    float stride[MAX_LEVELS];
    int total_c;
};

__device__ __forceinline__ void cell_range(double a, double b, double s, int size, double *lo, double *hi) {
    double l = fmin(fmax(a / s, 0.0), (double)size), h = fmin(fmax(b / s, 0.0), (double)size);
    double ext = fmax(h - l, MIN_EXTENT);
    double c = fmin(fmax((l + h) / 2, ext / 2), size - ext / 2);
    *lo = c - ext / 2;
    *hi = c + ext / 2;
}

__global__ void k_pool(Maps m, const float *__restrict__ boxes, float *__restrict__ out) {
    const int k = blockIdx.x, l = blockIdx.y;
    const float *b = boxes + 4 * k;
    const int C = m.c[l], H = m.h[l], W = m.w[l];
    const double s = m.stride[l];
    double x0, x1, y0, y1;
    cell_range(b[0], b[2], s, W, &x0, &x1);
    cell_range(b[1], b[3], s, H, &y0, &y1);
    int ix0 = max((int)floor(x0), 0), ix1 = min((int)ceil(x1), W);
    int iy0 = max((int)floor(y0), 0), iy1 = min((int)ceil(y1), H);
    const double area = (x1 - x0) * (y1 - y0);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float *plane = m.p[l] + (size_t)c * H * W;
        double acc = 0.0;
        for (int i = iy0; i < iy1; i++) {
            double wy = fmin(i + 1.0, y1) - fmax((double)i, y0);
            if (wy <= 0) continue;
            double row = 0.0;
            for (int j = ix0; j < ix1; j++) {
                double wx = fmin(j + 1.0, x1) - fmax((double)j, x0);
                if (wx > 0) row += wx * (double)plane[(size_t)i * W + j];
            }
            acc += wy * row;
        }
        out[(size_t)k * m.total_c + m.off[l] + c] = (float)(acc / area);
    }
}

extern "C" MRT_API int mrt_cuda_pool(const float *const *maps, const int *chw, const float *strides, int nlevels,
                                     const float *boxes, int n, float *out, void *stream) {
    MRT_CUDA_CHECK_ARG(maps && chw && strides && (n == 0 || (boxes && out)), "null pointer argument");
    MRT_CUDA_CHECK_ARG(nlevels >= 1 && nlevels <= MAX_LEVELS, "%d levels (1..8 supported)", nlevels);
    MRT_CUDA_CHECK_ARG(n >= 0, "negative box count %d", n);
    Maps m;
    m.total_c = 0;
    for (int l = 0; l < nlevels; l++) {
        MRT_CUDA_CHECK_ARG(maps[l] && chw[3 * l] > 0 && chw[3 * l + 1] > 0 && chw[3 * l + 2] > 0 && strides[l] > 0,
                           "level %d is empty or null", l);
        m.p[l] = maps[l];
        m.c[l] = chw[3 * l], m.h[l] = chw[3 * l + 1], m.w[l] = chw[3 * l + 2];
        m.stride[l] = strides[l];
        m.off[l] = m.total_c;
        m.total_c += m.c[l];
    }
    if (n == 0) return MRT_OK;
    dim3 grid(n, nlevels);
    k_pool<<<grid, 128, 0, (cudaStream_t)stream>>>(m, boxes, out);
    MRT_LAUNCHED();
    return MRT_OK;
}
