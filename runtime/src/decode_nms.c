/* YOLOv8 decode + class-aware NMS of one image (export/reference.py `decode` + `nms`).
 *
 * Fast path: the best class logit of every anchor is compared with logit(conf) (one vectorised pass over
 * cls_logits, no exp); only the anchors that pass get their float32 sigmoid score, the exact `score > conf`
 * test and go into a heap (popped in score order); DFL decoding (float64 softmax expectation) happens only for candidates NMS reaches.
 * NMS is greedy on the max_nms best, with the reference's float64 IoU, so the kept set is the reference's.
 * Non-finite model outputs never come out: an anchor with a NaN class logit is no candidate, and a candidate
 * whose decoded box is not finite (NaN/inf among its DFL logits) is dropped where NMS reaches it; it still
 * took one of the max_nms places (the cut is by score alone, as in the CUDA twin and the reference).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct {
    float score;
    int anchor;
    int cls;
} cand_t;

/* Order of the reference's stable argsort of -score: higher score first, then lower anchor index. */
static inline int before(const cand_t *a, const cand_t *b) {
    return a->score > b->score || (a->score == b->score && a->anchor < b->anchor);
}

static void sift_down(cand_t *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && before(&h[l], &h[m])) m = l;
        if (r < n && before(&h[r], &h[m])) m = r;
        if (m == i) return;
        cand_t t = h[i];
        h[i] = h[m], h[m] = t, i = m;
    }
}

/* Candidates come out of a heap in sorted order, so only the ones NMS reaches are ordered. */
static cand_t pop(cand_t *h, int *n) {
    cand_t top = h[0];
    h[0] = h[--*n];
    sift_down(h, *n, 0);
    return top;
}

static inline float sigmoid32(float x) { return (float)(1.0 / (1.0 + exp(-(double)x))); }

/* Best logit per anchor, its first class, the second-best logit and a NaN flag (one pass over the
 * (nc, A) logits, anchor-contiguous, branch-free so it vectorises). */
MRT_CLONES
static void best_logit(const float *restrict cls, int nc, int na, float *restrict best, int32_t *restrict arg,
                       float *restrict second, uint8_t *restrict nan) {
    for (int a = 0; a < na; a++) {
        best[a] = cls[a], arg[a] = 0, second[a] = -INFINITY;
        nan[a] = cls[a] != cls[a];
    }
    for (int c = 1; c < nc; c++) {
        const float *row = cls + (size_t)c * na;
        for (int a = 0; a < na; a++) {
            const float v = row[a], b = best[a], s2 = second[a];
            const int up = v > b;
            second[a] = up ? b : (v > s2 ? v : s2);
            arg[a] = up ? c : arg[a];
            best[a] = up ? v : b;
            nan[a] |= v != v;
        }
    }
}

/* Does box q (area qa) overlap any of the n kept boxes with IoU > thr? The reference's _iou_one(kept, q)
 * (same operands, same order, float64), over all kept boxes without early exit so it vectorises. */
MRT_CLONES
static int overlaps(const double *restrict x0, const double *restrict y0, const double *restrict x1,
                    const double *restrict y1, const double *restrict area, int n, const double *q, double qa,
                    double thr) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int j = 0; j < n; j++) {
        /* plain compares (inlined, vectorised), not fmin/fmax: they only differ on NaN boxes */
        double iw = (x1[j] < q[2] ? x1[j] : q[2]) - (x0[j] > q[0] ? x0[j] : q[0]);
        double ih = (y1[j] < q[3] ? y1[j] : q[3]) - (y0[j] > q[1] ? y0[j] : q[1]);
        double inter = (iw > 0 ? iw : 0) * (ih > 0 ? ih : 0);
        any |= inter / (area[j] + qa - inter + 1e-9) > thr;
    }
    return any;
}

/* Expected distance of one side: softmax over reg_max bins (float64) times bin index. */
static double dfl_side(const float *col, size_t stride, int reg_max) {
    double m = -INFINITY, e[64], s = 0.0, d = 0.0;
    for (int j = 0; j < reg_max; j++) m = (double)col[j * stride] > m ? (double)col[j * stride] : m;
    for (int j = 0; j < reg_max; j++) s += (e[j] = exp((double)col[j * stride] - m));
    for (int j = 0; j < reg_max; j++) d += e[j] / s * j;
    return d;
}

int mrt_decode_nms(const float *box_dist, const float *cls_logits, int na, int reg_max, int nc, const int *shapes,
                   const float *strides, int nlevels, float conf, float iou, int max_det, int max_nms, double gain_x,
                   double gain_y, double pad_x, double pad_y, int frame_h, int frame_w, float *boxes_frame, float *boxes_lb,
                   float *scores, int64_t *classes, int *n_out) {
    MRT_CHECK(box_dist && cls_logits && shapes && strides && boxes_lb && scores && classes && n_out,
              "null pointer argument");
    MRT_CHECK(na > 0 && nc > 0, "need anchors and classes (got A=%d, nc=%d)", na, nc);
    MRT_CHECK(reg_max >= 1 && reg_max <= 64, "reg_max %d out of range 1..64", reg_max);
    MRT_CHECK(nlevels >= 1 && nlevels <= 8, "%d levels (1..8 supported)", nlevels);
    MRT_CHECK(max_det >= 1 && max_nms >= 1, "max_det (%d) and max_nms (%d) must be >= 1", max_det, max_nms);
    MRT_CHECK(!isnan(conf) && !isnan(iou), "conf and iou must be numbers");
    long total = 0;
    for (int l = 0; l < nlevels; l++) {
        MRT_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0, "level %d has an empty shape", l);
        MRT_CHECK(strides[l] > 0, "level %d stride %g must be positive", l, (double)strides[l]);
        total += (long)shapes[2 * l] * shapes[2 * l + 1];
    }
    MRT_CHECK(total == na, "level shapes hold %ld anchors, the outputs %d", total, na);
    if (boxes_frame) {
        MRT_CHECK(gain_x > 0 && gain_y > 0 && frame_h > 0 && frame_w > 0, "letterbox gains / frame size must be positive");
    }
    *n_out = 0;

    float *best = malloc(sizeof(float) * 2 * (size_t)na), *second = best + na;
    int32_t *arg = malloc(sizeof(int32_t) * (size_t)na);
    uint8_t *nanf = malloc((size_t)na);
    cand_t *cand = malloc(sizeof(cand_t) * (size_t)na);
    if (!best || !arg || !nanf || !cand) {
        free(best), free(arg), free(nanf), free(cand);
        return MRT_FAIL(MRT_ENOMEM, "out of memory (decode of %d anchors)", na);
    }
    best_logit(cls_logits, nc, na, best, arg, second, nanf);

    /* logit-space prefilter, a little below the exact test so rounding never drops a keeper */
    const float conf_f = conf;
    double lo;
    if (conf_f <= 0.f)
        lo = -INFINITY;
    else if (conf_f >= 1.f)
        lo = INFINITY; /* a float32 sigmoid never exceeds 1 */
    else {
        double c = (double)conf_f * (1.0 - 1e-6);
        lo = log(c) - log1p(-c);
    }
    int nc_cand = 0;
    for (int a = 0; a < na; a++) {
        if (nanf[a] || !((double)best[a] > lo) ) continue;
        const float mx = best[a];
        const float s = sigmoid32(mx);
        if (!(s > conf_f)) continue;
        int cmax = arg[a];
        /* an earlier class with a smaller logit can round to the same float32 score (argmax takes it):
         * possible only if the second-best logit is within float32 rounding of the best score */
        if (cmax > 0 && (second[a] > mx - 1e-3f || s >= 0.999f)) { /* else the gap is far above an ulp */
            float below = nextafterf(s, 0.f);
            double mid = 0.5 * ((double)below + (double)s);
            double xlo = log(mid) - log1p(-mid) - 1e-6 * (1.0 + fabs((double)mx));
            for (int c = 0; c < cmax && (double)second[a] > xlo; c++) {
                float x = cls_logits[(size_t)c * na + a];
                if ((double)x > xlo && sigmoid32(x) == s) {
                    cmax = c;
                    break;
                }
            }
        }
        cand[nc_cand++] = (cand_t){s, a, cmax};
    }
    free(best), free(arg), free(nanf);
    for (int i = nc_cand / 2 - 1; i >= 0; i--) sift_down(cand, nc_cand, i);
    const int n = nc_cand < max_nms ? nc_cand : max_nms; /* the max_nms best */
    int heap_n = nc_cand;

    /* Greedy NMS written as "keep a candidate unless it overlaps a kept one": the same set as the
     * reference's suppress-forward loop, but a candidate is decoded only when reached and compared only
     * with the <= max_det kept boxes, and the loop stops at max_det. */
    double *bx = malloc(sizeof(double) * 5 * (size_t)max_det); /* kept boxes (class-shifted) + areas, SoA */
    if (!bx) {
        free(bx), free(cand);
        return MRT_FAIL(MRT_ENOMEM, "out of memory (NMS of %d candidates)", n);
    }
    int off[9];
    off[0] = 0;
    for (int l = 0; l < nlevels; l++) off[l + 1] = off[l] + shapes[2 * l] * shapes[2 * l + 1];
    const size_t side = (size_t)reg_max * na;
    const double thr = iou;
    double *kx0 = bx, *ky0 = bx + max_det, *kx1 = bx + 2 * max_det, *ky1 = bx + 3 * max_det, *ka = bx + 4 * max_det;
    int kept = 0;
    for (int i = 0; i < n && kept < max_det; i++) {
        const cand_t ci = pop(cand, &heap_n);
        int a = ci.anchor, l = 0;
        while (a >= off[l + 1]) l++;
        int k = a - off[l], w = shapes[2 * l + 1];
        double px = (float)(k % w) + 0.5f, py = (float)(k / w) + 0.5f, st = strides[l];
        const float *col = box_dist + a;
        double d0 = dfl_side(col, (size_t)na, reg_max), d1 = dfl_side(col + side, (size_t)na, reg_max);
        double d2 = dfl_side(col + 2 * side, (size_t)na, reg_max), d3 = dfl_side(col + 3 * side, (size_t)na, reg_max);
        float b[4] = {(float)((px - d0) * st), (float)((py - d1) * st), (float)((px + d2) * st), (float)((py + d3) * st)};
        /* NaN/inf in its DFL logits: the candidate is dropped (after the max_nms cut, like the CUDA twin) */
        if (!(isfinite(b[0]) && isfinite(b[1]) && isfinite(b[2]) && isfinite(b[3]))) continue;
        const double shift = ci.cls * MRT_MAX_WH;
        const double q[4] = {b[0] + shift, b[1] + shift, b[2] + shift, b[3] + shift};
        const double qa = (q[2] - q[0]) * (q[3] - q[1]);
        if (overlaps(kx0, ky0, kx1, ky1, ka, kept, q, qa, thr)) continue;
        kx0[kept] = q[0], ky0[kept] = q[1], kx1[kept] = q[2], ky1[kept] = q[3], ka[kept] = qa;
        memcpy(boxes_lb + 4 * kept, b, sizeof b);
        scores[kept] = ci.score;
        classes[kept] = ci.cls;
        if (boxes_frame) { /* from_letterbox in float32, as the reference does */
            const float gx = (float)gain_x, gy = (float)gain_y, fx = (float)pad_x, fy = (float)pad_y;
            float *o = boxes_frame + 4 * kept;
            for (int j = 0; j < 4; j++) {
                float v = (b[j] - ((j & 1) ? fy : fx)) / ((j & 1) ? gy : gx), hi = (float)((j & 1) ? frame_h : frame_w);
                o[j] = v < 0.f ? 0.f : (v > hi ? hi : v);
            }
        }
        kept++;
    }
    free(bx), free(cand);
    *n_out = kept;
    return MRT_OK;
}
