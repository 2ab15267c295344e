// CUDA twin of src/letterbox.c: one thread per output pixel, frame read from device memory (row stride
// in bytes), same integer arithmetic as cv2's uint8 INTER_LINEAR, so results equal the C library's.
#include <cuda_fp16.h>
#include <math.h>

#include "common.cuh"

struct Tap {
    int i0, i1, w0, w1;
};

__device__ __forceinline__ Tap tap(int d, int src, int dst) {
    const double scale = 1.0 / ((double)dst / src);
    float f = (float)((d + 0.5) * scale - 0.5);
    int s = (int)floorf(f);
    f -= (float)s;
    if (s < 0) s = 0, f = 0.f;
    if (s >= src - 1) s = src - 1, f = 0.f;
    Tap t;
    t.i0 = s;
    t.i1 = s + 1 < src ? s + 1 : src - 1;
    t.w0 = (int)rintf((1.f - f) * 2048.f);
    t.w1 = (int)rintf(f * 2048.f);
    return t;
}

template <bool HALF>
__global__ void k_letterbox(const uint8_t *__restrict__ bgr, int h, int w, ptrdiff_t stride, int size, int nw,
                            int nh, int left, int top, void *__restrict__ out) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= size || y >= size) return;
    const size_t plane = (size_t)size * size, o = (size_t)y * size + x;
    float v[3];
    const int sx = x - left, sy = y - top;
    if (sx < 0 || sx >= nw || sy < 0 || sy >= nh) {
        v[0] = v[1] = v[2] = (float)MRT_PAD_VALUE / 255.0f;
    } else if (nw == w && nh == h) {
        const uint8_t *p = bgr + (ptrdiff_t)sy * stride + 3 * sx;
        for (int c = 0; c < 3; c++) v[c] = (float)p[2 - c] / 255.0f;
    } else {
        const Tap tx = tap(sx, w, nw), ty = tap(sy, h, nh);
        const uint8_t *r0 = bgr + (ptrdiff_t)ty.i0 * stride, *r1 = bgr + (ptrdiff_t)ty.i1 * stride;
        for (int c = 0; c < 3; c++) {
            const int ch = 2 - c;  // output R, G, B from BGR
            int s0 = r0[3 * tx.i0 + ch] * tx.w0 + r0[3 * tx.i1 + ch] * tx.w1;
            int s1 = r1[3 * tx.i0 + ch] * tx.w0 + r1[3 * tx.i1 + ch] * tx.w1;
            int q = (((ty.w0 * (s0 >> 4)) >> 16) + ((ty.w1 * (s1 >> 4)) >> 16) + 2) >> 2;
            v[c] = (float)q / 255.0f;
        }
    }
    for (int c = 0; c < 3; c++) {
        if (HALF)
            ((__half *)out)[c * plane + o] = __float2half_rn(v[c]);
        else
            ((float *)out)[c * plane + o] = v[c];
    }
}

extern "C" MRT_API int mrt_cuda_letterbox(const uint8_t *bgr, int h, int w, ptrdiff_t row_stride, int size,
                                          int half, void *out, void *stream) {
    MRT_CUDA_CHECK_ARG(h > 0 && w > 0, "frame size %dx%d must be positive", w, h);
    MRT_CUDA_CHECK_ARG(size > 0 && size <= 16384, "letterbox size %d out of range 1..16384", size);
    MRT_CUDA_CHECK_ARG(bgr != nullptr && out != nullptr, "null frame or output pointer");
    MRT_CUDA_CHECK_ARG(row_stride >= (ptrdiff_t)w * 3, "row stride %td smaller than 3*width %d", row_stride,
                       3 * w);
    // geometry exactly as mrt_letterbox_plan (host, float64, round half to even)
    double sh = (double)size / h, sw = (double)size / w, r = sh < sw ? sh : sw;
    double fw = rint(w * r), fh = rint(h * r);
    int nw = fw < 1 ? 1 : (int)fw, nh = fh < 1 ? 1 : (int)fh;
    int left = (int)rint((size - nw) / 2.0 - 0.1), top = (int)rint((size - nh) / 2.0 - 0.1);
    dim3 block(32, 8), grid(mrt_blocks(size, 32), mrt_blocks(size, 8));
    cudaStream_t s = (cudaStream_t)stream;
    if (half)
        k_letterbox<true><<<grid, block, 0, s>>>(bgr, h, w, row_stride, size, nw, nh, left, top, out);
    else
        k_letterbox<false><<<grid, block, 0, s>>>(bgr, h, w, row_stride, size, nw, nh, left, top, out);
    MRT_LAUNCHED();
    return MRT_OK;
}
