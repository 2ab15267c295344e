/* Letterbox + normalise: uint8 BGR HWC frame -> RGB CHW float32/float16 in [0, 1], square, pad 114.
 *
 * Geometry of ultralytics' LetterBox(auto=False). Resampling reproduces cv2.resize(INTER_LINEAR) on uint8
 * images integer for integer: half-pixel centres (sx = (dx + 0.5) / (new_w / w) - 0.5 in float32, edge
 * taps clamped), 11-bit weights (1 - f and f each rounded), a horizontal pass to int32 row sums and
 * cv2's vectorised vertical rounding ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2.
 * The uint8 value is then divided by 255 in float32 (as the reference's /255.0 does): in our checks the
 * output equals cv2 + /255 exactly. One pass over the output rows; the two source rows an output row
 * needs are resampled horizontally (planar, cached for the next output row) and blended vertically.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int mrt_letterbox_plan(int h, int w, int size, mrt_letterbox_params *p) {
    MRT_CHECK(h > 0 && w > 0, "frame size %dx%d must be positive", w, h);
    MRT_CHECK(size > 0 && size <= 16384, "letterbox size %d out of range 1..16384", size);
    MRT_CHECK(p != NULL, "null parameter pointer");
    double sh = (double)size / h, sw = (double)size / w;
    double r = sh < sw ? sh : sw;
    double nw = rint(w * r), nh = rint(h * r); /* rint: round half to even, like Python's round() */
    p->r = r;
    p->new_w = nw < 1 ? 1 : (int)nw;
    p->new_h = nh < 1 ? 1 : (int)nh;
    p->left = (int)rint((size - p->new_w) / 2.0 - 0.1);
    p->top = (int)rint((size - p->new_h) / 2.0 - 0.1);
    return MRT_OK;
}

/* Taps of one axis (cv2 INTER_LINEAR, 11-bit coefficients): first tap, second tap, two weights. */
static void taps(int src, int dst, int *i0, int *i1, int32_t *w0, int32_t *w1) {
    const double scale = 1.0 / ((double)dst / src);
    for (int d = 0; d < dst; d++) {
        float f = (float)((d + 0.5) * scale - 0.5);
        int s = (int)floorf(f);
        f -= (float)s;
        if (s < 0) s = 0, f = 0.f;
        if (s >= src - 1) s = src - 1, f = 0.f;
        i0[d] = s;
        i1[d] = s + 1 < src ? s + 1 : src - 1;
        w0[d] = (int32_t)rintf((1.f - f) * 2048.f);
        w1[d] = (int32_t)rintf(f * 2048.f);
    }
}

/* Horizontal pass of one source row into planar int32 sums (B, G, R planes of nw each). */
MRT_CLONES
static void hpass_c(const uint8_t *restrict s, const int *restrict x0, const int *restrict x1,
                    const int32_t *restrict w0, const int32_t *restrict w1, int from, int nw,
                    int32_t *restrict out) {
    int32_t *restrict b = out, *restrict g = out + nw, *restrict r = out + 2 * nw;
    for (int x = from; x < nw; x++) {
        const uint8_t *p = s + 3 * x0[x], *q = s + 3 * x1[x];
        b[x] = p[0] * w0[x] + q[0] * w1[x];
        g[x] = p[1] * w0[x] + q[1] * w1[x];
        r[x] = p[2] * w0[x] + q[2] * w1[x];
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MRT_HPASS_AVX2 1
/* AVX2 twin of hpass_c for the first `nvec` outputs (a multiple of 8, second tap = first + 1 and 8 bytes
 * readable from the first tap, so the loads stay inside the row). One 8-byte gather per output fetches
 * both taps' B, G, R; byte shuffles pair the taps of each channel as 16-bit halves (tap0 | tap1 << 16)
 * and one multiply-add with the packed weights gives tap0 * w0 + tap1 * w1: the integers of the C loop.
 * `xoff` holds the first taps' byte offsets of each 8 outputs in the order 0 1 4 5 2 3 6 7, so that the
 * 64-bit unpacks come out in output order. */
__attribute__((target("avx2"))) static void hpass_avx2(const uint8_t *s, const int *xoff, const int32_t *wpack,
                                                       int nvec, int nw, int32_t *out) {
    int32_t *b = out, *g = out + nw, *r = out + 2 * nw;
    const long long *base = (const long long *)(const void *)s;
    /* per 128-bit lane (two outputs' 8 bytes: B0 G0 R0 B1 G1 R1 . .): dwords B(q0) B(q1) G(q0) G(q1) */
    const __m256i bg = _mm256_setr_epi8(0, -1, 3, -1, 8, -1, 11, -1, 1, -1, 4, -1, 9, -1, 12, -1,
                                        0, -1, 3, -1, 8, -1, 11, -1, 1, -1, 4, -1, 9, -1, 12, -1);
    const __m256i rr = _mm256_setr_epi8(2, -1, 5, -1, 10, -1, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        2, -1, 5, -1, 10, -1, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int x = 0; x < nvec; x += 8) {
        const __m128i ia = _mm_loadu_si128((const __m128i *)(xoff + x));
        const __m128i ib = _mm_loadu_si128((const __m128i *)(xoff + x + 4));
        const __m256i qa = _mm256_i32gather_epi64(base, ia, 1); /* outputs 0 1 | 4 5 */
        const __m256i qb = _mm256_i32gather_epi64(base, ib, 1); /* outputs 2 3 | 6 7 */
        const __m256i ga = _mm256_shuffle_epi8(qa, bg), gb = _mm256_shuffle_epi8(qb, bg);
        const __m256i ra = _mm256_shuffle_epi8(qa, rr), rb = _mm256_shuffle_epi8(qb, rr);
        const __m256i w = _mm256_loadu_si256((const __m256i *)(wpack + x));
        _mm256_storeu_si256((__m256i *)(b + x), _mm256_madd_epi16(_mm256_unpacklo_epi64(ga, gb), w));
        _mm256_storeu_si256((__m256i *)(g + x), _mm256_madd_epi16(_mm256_unpackhi_epi64(ga, gb), w));
        _mm256_storeu_si256((__m256i *)(r + x), _mm256_madd_epi16(_mm256_unpacklo_epi64(ra, rb), w));
    }
}
#endif

/* Horizontal pass: the AVX2 gather kernel where the CPU has it and the taps allow, C for the rest. */
static void hpass(const uint8_t *restrict s, const int *restrict x0, const int *restrict x1,
                  const int32_t *restrict w0, const int32_t *restrict w1, const int *xoff, const int32_t *wpack,
                  int nvec, int nw, int32_t *restrict out) {
#ifdef MRT_HPASS_AVX2
    if (nvec > 0) hpass_avx2(s, xoff, wpack, nvec, nw, out);
#else
    (void)xoff, (void)wpack;
    nvec = 0;
#endif
    hpass_c(s, x0, x1, w0, w1, nvec, nw, out);
}

/* Vertical blend of two horizontal sums into uint8 values / 255 (float32). */
MRT_CLONES
static void vpass(const int32_t *restrict h0, const int32_t *restrict h1, int32_t b0, int32_t b1, int n,
                  float *restrict out) {
    for (int x = 0; x < n; x++) {
        int32_t v = (((b0 * (h0[x] >> 4)) >> 16) + ((b1 * (h1[x] >> 4)) >> 16) + 2) >> 2;
        out[x] = (float)v / 255.0f;
    }
}

MRT_CLONES
static void vpass16(const int32_t *restrict h0, const int32_t *restrict h1, int32_t b0, int32_t b1, int n,
                    const uint16_t *restrict lut, uint16_t *restrict out) {
    for (int x = 0; x < n; x++) out[x] = lut[(((b0 * (h0[x] >> 4)) >> 16) + ((b1 * (h1[x] >> 4)) >> 16) + 2) >> 2];
}

/* No resize: one interleaved BGR row -> the B, G, R output planes (one pass, vectorised by the compiler). */
MRT_CLONES
static void direct32(const uint8_t *restrict s, int n, float *restrict b, float *restrict g, float *restrict r) {
    for (size_t x = 0; x < (size_t)n; x++) {
        b[x] = (float)s[3 * x] / 255.0f;
        g[x] = (float)s[3 * x + 1] / 255.0f;
        r[x] = (float)s[3 * x + 2] / 255.0f;
    }
}

MRT_CLONES
static void direct16(const uint8_t *restrict s, int n, const uint16_t *restrict lut, uint16_t *restrict b,
                     uint16_t *restrict g, uint16_t *restrict r) {
    for (size_t x = 0; x < (size_t)n; x++) {
        b[x] = lut[s[3 * x]];
        g[x] = lut[s[3 * x + 1]];
        r[x] = lut[s[3 * x + 2]];
    }
}

#define LB_PREFETCH_AHEAD 6 /* output rows */

static inline void prefetch_row(const uint8_t *p, int n) {
#if defined(__GNUC__)
    for (int i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 3);
#else
    (void)p, (void)n;
#endif
}

typedef struct {
    const uint8_t *bgr;
    ptrdiff_t row_stride;
    int size, half, keep_pad, nw, nh, left, top, direct, y0, y1, row_bytes;
    const int *xi, *yi;
    const int32_t *wx, *wy, *wpack;
    const int *xoff;
    int nvec; /* outputs of each row the vector horizontal kernel takes (0: none) */
    const uint16_t *lut16;
    int32_t *hrow; /* two cached horizontally resampled source rows, 3 planes of nw each */
    void *out;
} lb_job;

/* Output rows [y0, y1) of the letterbox. */
static void *lb_rows(void *arg) {
    const lb_job *j = arg;
    const int size = j->size, nw = j->nw, nh = j->nh, left = j->left, top = j->top;
    const size_t plane = (size_t)size * size;
    const float pad = (float)MRT_PAD_VALUE / 255.0f;
    const uint16_t pad16 = mrt_f32_to_f16(pad);
    float *o32 = (float *)j->out;
    uint16_t *o16 = (uint16_t *)j->out;
    int cached[2] = {-1, -1}; /* source row held by each slot */
    for (int y = j->y0; y < j->y1; y++) {
        const size_t row = (size_t)y * size;
        const int sy = y - top;
        /* the frame is usually cold (a new frame; the model ran since): fetch the source rows of a later
         * output row now. A downscale jumps over rows, which the hardware prefetcher does not follow (measured:
         * 1080p -> 320 on one thread, a new frame each call: 0.57 -> 0.25 ms; 0.17 ms hot; -> 640: 1.02 -> 0.46 ms). */
        const int sa = sy + LB_PREFETCH_AHEAD;
        if (!j->direct && sa >= 0 && sa < nh && y + LB_PREFETCH_AHEAD < j->y1) {
            prefetch_row(j->bgr + (ptrdiff_t)j->yi[sa] * j->row_stride, j->row_bytes);
            prefetch_row(j->bgr + (ptrdiff_t)j->yi[nh + sa] * j->row_stride, j->row_bytes);
        }
        if (sy < 0 || sy >= nh) { /* a padding row */
            if (j->keep_pad) continue;
            for (int c = 0; c < 3; c++) {
                if (j->half)
                    for (int x = 0; x < size; x++) o16[c * plane + row + x] = pad16;
                else
                    for (int x = 0; x < size; x++) o32[c * plane + row + x] = pad;
            }
            continue;
        }
        if (j->direct) {
            const uint8_t *s = j->bgr + (ptrdiff_t)sy * j->row_stride;
            const size_t at = row + (size_t)left;
            if (j->half)
                direct16(s, nw, j->lut16, o16 + 2 * plane + at, o16 + plane + at, o16 + at);
            else
                direct32(s, nw, o32 + 2 * plane + at, o32 + plane + at, o32 + at);
        } else {
            const int src[2] = {j->yi[sy], j->yi[nh + sy]};
            int slot[2];
            for (int k = 0; k < 2; k++) {
                slot[k] = cached[0] == src[k] ? 0 : (cached[1] == src[k] ? 1 : -1);
                if (slot[k] >= 0) continue;
                /* fill the slot the other tap does not use */
                const int other = k == 0 ? (cached[0] == src[1] ? 0 : (cached[1] == src[1] ? 1 : -1)) : slot[0];
                slot[k] = other == 0 ? 1 : 0;
                hpass(j->bgr + (ptrdiff_t)src[k] * j->row_stride, j->xi, j->xi + nw, j->wx, j->wx + nw,
                      j->xoff, j->wpack, j->nvec, nw, j->hrow + 3 * (size_t)nw * slot[k]);
                cached[slot[k]] = src[k];
            }
            for (int c = 0; c < 3; c++) { /* hrow planes are B, G, R; output planes R, G, B */
                const int32_t *a = j->hrow + 3 * (size_t)nw * slot[0] + (size_t)(2 - c) * nw;
                const int32_t *b = j->hrow + 3 * (size_t)nw * slot[1] + (size_t)(2 - c) * nw;
                if (j->half)
                    vpass16(a, b, j->wy[sy], j->wy[nh + sy], nw, j->lut16, o16 + c * plane + row + left);
                else
                    vpass(a, b, j->wy[sy], j->wy[nh + sy], nw, o32 + c * plane + row + left);
            }
        }
        for (int c = 0; c < 3 && !j->keep_pad; c++) {
            if (j->half) {
                uint16_t *o = o16 + c * plane + row;
                for (int x = 0; x < left; x++) o[x] = pad16;
                for (int x = left + nw; x < size; x++) o[x] = pad16;
            } else {
                float *o = o32 + c * plane + row;
                for (int x = 0; x < left; x++) o[x] = pad;
                for (int x = left + nw; x < size; x++) o[x] = pad;
            }
        }
    }
    return NULL;
}

#define LB_MAX_THREADS 4
#define LB_THREAD_PIXELS 120000 /* resized pixels per extra thread */

int mrt_letterbox(const uint8_t *bgr, int h, int w, ptrdiff_t row_stride, int size, int half, void *out,
                  mrt_letterbox_params *pout) {
    return mrt_letterbox_ex(bgr, h, w, row_stride, size, half ? MRT_LB_HALF : 0, out, pout);
}

int mrt_letterbox_ex(const uint8_t *bgr, int h, int w, ptrdiff_t row_stride, int size, int flags, void *out,
                     mrt_letterbox_params *pout) {
    MRT_CHECK((flags & ~(MRT_LB_HALF | MRT_LB_KEEP_PAD)) == 0, "unknown letterbox flags 0x%x", flags);
    const int half = (flags & MRT_LB_HALF) != 0, keep_pad = (flags & MRT_LB_KEEP_PAD) != 0;
    mrt_letterbox_params p;
    int rc = mrt_letterbox_plan(h, w, size, &p);
    if (rc) return rc;
    MRT_CHECK(bgr != NULL && out != NULL, "null frame or output pointer");
    MRT_CHECK(row_stride >= (ptrdiff_t)w * 3, "row stride %td smaller than 3*width %d", row_stride, 3 * w);
    if (pout) *pout = p;
    const int nw = p.new_w, nh = p.new_h;
    /* one thread unless asked (mrt_set_threads): on a loaded 2-core machine a second thread did not pay */
    int nt = mrt_threads(1);
    long by_size = (long)nw * nh / LB_THREAD_PIXELS;
    if (nt > by_size) nt = by_size < 1 ? 1 : (int)by_size;
    if (nt > LB_MAX_THREADS) nt = LB_MAX_THREADS;

    int *xi = malloc(sizeof(int) * 2 * (size_t)nw), *yi = malloc(sizeof(int) * 2 * (size_t)nh);
    int32_t *wx = malloc(sizeof(int32_t) * 2 * (size_t)nw), *wy = malloc(sizeof(int32_t) * 2 * (size_t)nh);
    int32_t *hrow = malloc(sizeof(int32_t) * 6 * (size_t)nw * nt), *wpack = malloc(sizeof(int32_t) * (size_t)nw);
    int *xoff = malloc(sizeof(int) * (size_t)nw);
    if (!xi || !yi || !wx || !wy || !hrow || !wpack || !xoff) {
        free(xi), free(yi), free(wx), free(wy), free(hrow), free(wpack), free(xoff);
        return MRT_FAIL(MRT_ENOMEM, "out of memory (letterbox %dx%d -> %d)", w, h, size);
    }
    taps(w, nw, xi, xi + nw, wx, wx + nw);
    taps(h, nh, yi, yi + nh, wy, wy + nh);
    int nvec = 0; /* vector kernel: the leading outputs (whole 8s) whose taps are x, x + 1 with x <= w - 3 */
#ifdef MRT_HPASS_AVX2
    if (__builtin_cpu_supports("avx2")) {
        while (nvec < nw && xi[nvec] <= w - 3 && xi[nw + nvec] == xi[nvec] + 1) nvec++;
        nvec &= ~7;
    }
    static const int order[8] = {0, 1, 4, 5, 2, 3, 6, 7};
    for (int x = 0; x < nvec; x++) xoff[x] = 3 * xi[(x & ~7) + order[x & 7]];
#endif
    for (int x = 0; x < nw; x++) wpack[x] = (int32_t)((uint32_t)wx[x] | ((uint32_t)wx[nw + x] << 16));
    uint16_t lut16[256]; /* float16 bits of v / 255 (v / 255 computed in float32 first, like the f32 path) */
    for (int v = 0; v < 256; v++) lut16[v] = mrt_f32_to_f16((float)v / 255.0f);
    lb_job jobs[LB_MAX_THREADS];
    for (int t = 0; t < nt; t++)
        jobs[t] = (lb_job){bgr, row_stride, size, half, keep_pad, nw, nh, p.left, p.top, nw == w && nh == h,
                           (int)((long)size * t / nt), (int)((long)size * (t + 1) / nt), 3 * w, xi, yi, wx, wy, wpack, xoff, nvec, lut16,
                           hrow + 6 * (size_t)nw * t, out};
    mrt_parallel(lb_rows, jobs, sizeof(lb_job), nt);
    free(xi), free(yi), free(wx), free(wy), free(hrow), free(wpack), free(xoff);
    return MRT_OK;
}
