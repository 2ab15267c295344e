// CUDA twin of src/decode_nms.c: per-anchor best class + exact score test (one thread per anchor, keys
// written for every anchor, so no atomics decide the order), a CUB radix sort of (score desc, anchor asc)
// keys (the C heap's order), DFL decoding of only the max_nms best (top-k), a bitmask of IoU > iou over
// those candidate pairs (float64, the reference's formula; max_nms^2 bits) and a one-block greedy walk over
// the mask (a candidate whose box is not finite is skipped there, as the C library drops it). Results equal
// the C library's.
#include <cub/device/device_radix_sort.cuh>
#include <math.h>

#include "common.cuh"

#define MAX_LEVELS 8

struct Box64 {  // a box shifted by its class offset, float64 (Box64 is deprecated in CUDA 13)
    double x0, y0, x1, y1;
};

struct Levels {
    int n;
    int off[MAX_LEVELS + 1];
    int w[MAX_LEVELS];
    float stride[MAX_LEVELS];
};

__device__ __forceinline__ float sigmoid32(float x) { return (float)(1.0 / (1.0 + exp(-(double)x))); }

// key: high 32 bits = ~score bits (scores are >= 0, so larger score -> smaller key), low 32 = anchor.
__global__ void k_candidates(const float *__restrict__ cls, int na, int nc, float conf, double lo,
                             unsigned long long *__restrict__ keys, int *__restrict__ cls_out,
                             int *__restrict__ count) {
    const int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= na) return;
    float mx = cls[a];
    bool nan = mx != mx;
    for (int c = 1; c < nc; c++) {
        float v = cls[(size_t)c * na + a];
        nan |= v != v;
        mx = v > mx ? v : mx;
    }
    unsigned long long key = ~0ull;
    int best = 0;
    if (!nan && (double)mx > lo) {
        const float s = sigmoid32(mx);
        if (s > conf) {
            while (cls[(size_t)best * na + a] != mx) best++;
            if (best > 0) {  // an earlier class may round to the same float32 score: argmax takes it
                float below = nextafterf(s, 0.f);
                double mid = 0.5 * ((double)below + (double)s);
                double xlo = log(mid) - log1p(-mid) - 1e-6 * (1.0 + fabs((double)mx));
                for (int c = 0; c < best; c++) {
                    float x = cls[(size_t)c * na + a];
                    if ((double)x > xlo && sigmoid32(x) == s) {
                        best = c;
                        break;
                    }
                }
            }
            key = ((unsigned long long)(~__float_as_uint(s)) << 32) | (unsigned)a;
            atomicAdd(count, 1);
        }
    }
    keys[a] = key;
    cls_out[a] = best;
}

__device__ double dfl_side(const float *col, size_t stride, int reg_max) {
    double m = -INFINITY, s = 0.0, d = 0.0;
    for (int j = 0; j < reg_max; j++) m = fmax(m, (double)col[j * stride]);
    for (int j = 0; j < reg_max; j++) s += exp((double)col[j * stride] - m);
    for (int j = 0; j < reg_max; j++) d += exp((double)col[j * stride] - m) / s * j;
    return d;
}

__global__ void k_decode(const float *__restrict__ box_dist, int na, int reg_max, Levels lv,
                         const unsigned long long *__restrict__ keys, const int *__restrict__ cls_sorted,
                         const int *__restrict__ count, int max_nms, float4 *__restrict__ boxes,
                         Box64 *__restrict__ shifted, float *__restrict__ score) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int n = min(*count, max_nms);
    if (i >= n) return;
    const unsigned long long key = keys[i];
    const int a = (int)(key & 0xffffffffu);
    int l = 0;
    while (a >= lv.off[l + 1]) l++;
    const int k = a - lv.off[l], w = lv.w[l];
    const double px = (float)(k % w) + 0.5f, py = (float)(k / w) + 0.5f, st = lv.stride[l];
    const size_t side = (size_t)reg_max * na;
    const float *col = box_dist + a;
    const double d0 = dfl_side(col, na, reg_max), d1 = dfl_side(col + side, na, reg_max);
    const double d2 = dfl_side(col + 2 * side, na, reg_max), d3 = dfl_side(col + 3 * side, na, reg_max);
    float4 b = make_float4((float)((px - d0) * st), (float)((py - d1) * st), (float)((px + d2) * st),
                           (float)((py + d3) * st));
    const double sh = cls_sorted[i] * MRT_MAX_WH;
    boxes[i] = b;
    shifted[i] = Box64{b.x + sh, b.y + sh, b.z + sh, b.w + sh};
    score[i] = __uint_as_float(~(unsigned)(key >> 32));
}

// mask[i * words + cb] bit t: candidate j = 64 cb + t (j > i) has IoU(i, j) > iou.
__global__ void k_mask(const Box64 *__restrict__ shifted, const int *__restrict__ count, int max_nms, double iou,
                       int words, unsigned long long *__restrict__ mask) {
    const int n = min(*count, max_nms);
    const int rb = blockIdx.y, cb = blockIdx.x;
    if (rb * 64 >= n || cb * 64 >= n || cb < rb) return;
    __shared__ Box64 col[64];
    const int t = threadIdx.x;
    if (cb * 64 + t < n) col[t] = shifted[cb * 64 + t];
    __syncthreads();
    const int i = rb * 64 + t;
    if (i >= n) return;
    const Box64 p = shifted[i];
    const double pa = (p.x1 - p.x0) * (p.y1 - p.y0);
    unsigned long long bits = 0;
    const int jn = min(64, n - cb * 64);
    for (int u = 0; u < jn; u++) {
        const int j = cb * 64 + u;
        if (j <= i) continue;
        const Box64 q = col[u];
        double iw = fmin(p.x1, q.x1) - fmax(p.x0, q.x0), ih = fmin(p.y1, q.y1) - fmax(p.y0, q.y0);
        double inter = (iw > 0 ? iw : 0) * (ih > 0 ? ih : 0);
        if (inter / (pa + (q.x1 - q.x0) * (q.y1 - q.y0) - inter + 1e-9) > iou) bits |= 1ull << u;
    }
    mask[(size_t)i * words + cb] = bits;
}

__global__ void k_reduce(const unsigned long long *__restrict__ mask, const int *__restrict__ count, int max_nms,
                         int words, int max_det, const float4 *__restrict__ boxes, const float *__restrict__ score,
                         const int *__restrict__ cls_sorted, float gx, float gy, float pad_x, float pad_y, int frame_h,
                         int frame_w, int want_frame, float *__restrict__ boxes_frame, float *__restrict__ boxes_lb,
                         float *__restrict__ scores, int64_t *__restrict__ classes, int *__restrict__ n_out) {
    extern __shared__ unsigned long long removed[];
    __shared__ int keep;
    const int n = min(*count, max_nms);
    const int nw = (n + 63) / 64;
    for (int k = threadIdx.x; k < nw; k += blockDim.x) removed[k] = 0;
    __syncthreads();
    int kept = 0;
    for (int i = 0; i < n && kept < max_det; i++) {
        if (threadIdx.x == 0) {  // a box that is not finite (NaN/inf DFL logits) is dropped, suppresses nothing
            const float4 b = boxes[i];
            keep = !((removed[i / 64] >> (i % 64)) & 1ull) && isfinite(b.x) && isfinite(b.y) && isfinite(b.z) &&
                   isfinite(b.w);
        }
        __syncthreads();
        if (keep) {
            if (threadIdx.x == 0) {
                const float4 b = boxes[i];
                const float v[4] = {b.x, b.y, b.z, b.w};
                for (int j = 0; j < 4; j++) {
                    boxes_lb[4 * kept + j] = v[j];
                    if (want_frame) {
                        float f = (v[j] - ((j & 1) ? pad_y : pad_x)) / ((j & 1) ? gy : gx), hi = (float)((j & 1) ? frame_h : frame_w);
                        boxes_frame[4 * kept + j] = f < 0.f ? 0.f : (f > hi ? hi : f);
                    }
                }
                scores[kept] = score[i];
                classes[kept] = cls_sorted[i];
            }
            const unsigned long long *row = mask + (size_t)i * words;
            for (int k = i / 64 + threadIdx.x; k < nw; k += blockDim.x) removed[k] |= row[k];
            kept++;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) *n_out = kept;
}

namespace {
struct Layout {
    size_t count, keys, keys_sorted, cls, cls_sorted, boxes, shifted, score, mask, temp, temp_bytes, total;
    int nmax, words;
};

size_t align(size_t x) { return (x + 255) & ~(size_t)255; }

int layout(int na, int max_nms, Layout *L) {
    L->nmax = na < max_nms ? na : max_nms;
    L->words = (L->nmax + 63) / 64;
    size_t temp = 0;
    cudaError_t e = cub::DeviceRadixSort::SortPairs(nullptr, temp, (unsigned long long *)nullptr,
                                                    (unsigned long long *)nullptr, (int *)nullptr, (int *)nullptr, na);
    if (e != cudaSuccess) return MRT_CUDA_FAIL(MRT_ECUDA, "cub sort sizing: %s", cudaGetErrorString(e));
    size_t o = 0;
    L->count = o, o += align(sizeof(int));
    L->keys = o, o += align(sizeof(unsigned long long) * na);
    L->keys_sorted = o, o += align(sizeof(unsigned long long) * na);
    L->cls = o, o += align(sizeof(int) * na);
    L->cls_sorted = o, o += align(sizeof(int) * na);
    L->boxes = o, o += align(sizeof(float4) * L->nmax);
    L->shifted = o, o += align(sizeof(Box64) * L->nmax);
    L->score = o, o += align(sizeof(float) * L->nmax);
    L->mask = o, o += align(sizeof(unsigned long long) * L->nmax * L->words);
    L->temp = o, L->temp_bytes = temp, o += align(temp);
    L->total = o;
    return MRT_OK;
}
}  // namespace

extern "C" MRT_API size_t mrt_cuda_decode_nms_workspace(int num_anchors, int nc, int max_nms) {
    (void)nc;
    Layout L;
    if (num_anchors <= 0 || max_nms <= 0 || layout(num_anchors, max_nms, &L) != MRT_OK) return 0;
    return L.total;
}

extern "C" MRT_API int mrt_cuda_decode_nms(const float *box_dist, const float *cls_logits, int na, int reg_max,
                                           int nc, const int *shapes, const float *strides, int nlevels,
                                           float conf, float iou, int max_det, int max_nms, double gain_x, double gain_y, double pad_x,
                                           double pad_y, int frame_h, int frame_w, void *workspace,
                                           size_t workspace_bytes, float *boxes_frame, float *boxes_lb,
                                           float *scores, int64_t *classes, int *n_out, void *stream) {
    MRT_CUDA_CHECK_ARG(box_dist && cls_logits && shapes && strides && boxes_lb && scores && classes && n_out &&
                           workspace,
                       "null pointer argument");
    MRT_CUDA_CHECK_ARG(na > 0 && nc > 0, "need anchors and classes (got A=%d, nc=%d)", na, nc);
    MRT_CUDA_CHECK_ARG(reg_max >= 1 && reg_max <= 64, "reg_max %d out of range 1..64", reg_max);
    MRT_CUDA_CHECK_ARG(nlevels >= 1 && nlevels <= MAX_LEVELS, "%d levels (1..8 supported)", nlevels);
    MRT_CUDA_CHECK_ARG(max_det >= 1 && max_nms >= 1, "max_det (%d) and max_nms (%d) must be >= 1", max_det,
                       max_nms);
    MRT_CUDA_CHECK_ARG(!isnan(conf) && !isnan(iou), "conf and iou must be numbers");
    Levels lv;
    lv.n = nlevels;
    lv.off[0] = 0;
    for (int l = 0; l < nlevels; l++) {
        MRT_CUDA_CHECK_ARG(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0 && strides[l] > 0, "level %d is empty", l);
        lv.off[l + 1] = lv.off[l] + shapes[2 * l] * shapes[2 * l + 1];
        lv.w[l] = shapes[2 * l + 1];
        lv.stride[l] = strides[l];
    }
    MRT_CUDA_CHECK_ARG(lv.off[nlevels] == na, "level shapes hold %d anchors, the outputs %d", lv.off[nlevels], na);
    if (boxes_frame) MRT_CUDA_CHECK_ARG(gain_x > 0 && gain_y > 0 && frame_h > 0 && frame_w > 0, "scale / frame size must be positive");
    Layout L;
    int rc = layout(na, max_nms, &L);
    if (rc) return rc;
    MRT_CUDA_CHECK_ARG(workspace_bytes >= L.total, "workspace of %zu bytes, %zu needed", workspace_bytes, L.total);
    size_t shared = sizeof(unsigned long long) * L.words;
    MRT_CUDA_CHECK_ARG(shared <= 48 * 1024, "max_nms %d too large for the one-block NMS walk", L.nmax);

    char *ws = (char *)workspace;
    int *count = (int *)(ws + L.count);
    unsigned long long *keys = (unsigned long long *)(ws + L.keys), *keys_s = (unsigned long long *)(ws + L.keys_sorted);
    int *cls = (int *)(ws + L.cls), *cls_s = (int *)(ws + L.cls_sorted);
    float4 *boxes = (float4 *)(ws + L.boxes);
    Box64 *shifted = (Box64 *)(ws + L.shifted);
    float *score = (float *)(ws + L.score);
    unsigned long long *mask = (unsigned long long *)(ws + L.mask);
    cudaStream_t s = (cudaStream_t)stream;

    const float conf_f = conf;
    double lo;
    if (conf_f <= 0.f)
        lo = -INFINITY;
    else if (conf_f >= 1.f)
        lo = INFINITY;
    else {
        double c = (double)conf_f * (1.0 - 1e-6);
        lo = log(c) - log1p(-c);
    }
    MRT_CUDA(cudaMemsetAsync(count, 0, sizeof(int), s));
    k_candidates<<<mrt_blocks(na, 256), 256, 0, s>>>(cls_logits, na, nc, conf_f, lo, keys, cls, count);
    MRT_LAUNCHED();
    size_t temp_bytes = L.temp_bytes;
    MRT_CUDA(cub::DeviceRadixSort::SortPairs(ws + L.temp, temp_bytes, keys, keys_s, cls, cls_s, na, 0, 64, s));
    k_decode<<<mrt_blocks(L.nmax, 128), 128, 0, s>>>(box_dist, na, reg_max, lv, keys_s, cls_s, count, max_nms, boxes,
                                                     shifted, score);
    MRT_LAUNCHED();
    dim3 grid(L.words, L.words);
    k_mask<<<grid, 64, 0, s>>>(shifted, count, max_nms, (double)iou, L.words, mask);
    MRT_LAUNCHED();
    k_reduce<<<1, 256, shared, s>>>(mask, count, max_nms, L.words, max_det, boxes, score, cls_s, (float)gain_x, (float)gain_y,
                                    (float)pad_x, (float)pad_y, frame_h, frame_w, boxes_frame != nullptr,
                                    boxes_frame, boxes_lb, scores, classes, n_out);
    MRT_LAUNCHED();
    return MRT_OK;
}
