/* mocha_rt: the native runtime of mocha-edge (letterbox, YOLOv8 decode + NMS, box pooling, matching).
 *
 * A narrow C ABI: plain pointers, sizes and status codes. Every function returns MRT_OK (0) or an error
 * code; mrt_last_error() then gives a one-line message with the C file and line (thread-local).
 * Tensors are row-major and contiguous unless a stride is given. The CPU functions are in libmocha_rt
 * (portable C11, libm + pthread); the CUDA twins (mrt_cuda_*) in libmocha_rt_cuda take device pointers
 * and a cudaStream_t passed as void*, and run asynchronously on that stream unless said otherwise.
 *
 * Rules (the Python reference each op is tested against):
 *   letterbox  - ultralytics LetterBox(auto=False), cv2.INTER_LINEAR, pad 114  (mocha_edge.infer.letterbox)
 *   decode_nms - DFL decode + single-label class-aware greedy NMS             (export/reference.py)
 *   pool       - box-area-mean/v2                                              (models/pooling.py)
 *   match      - cosine nearest prototype, conditional | global               (mocha_edge.prototypes.match)
 *                with optional vector centring, linear projection,            (prototypes.centre_vectors,
 *                per-prototype thresholds and "not NAME" corrections           decide, refuse)
 */
#ifndef MOCHA_RT_H
#define MOCHA_RT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MRT_ABI_VERSION 4

#if defined(__GNUC__)
#define MRT_API __attribute__((visibility("default")))
#else
#define MRT_API
#endif

enum mrt_status { MRT_OK = 0, MRT_EINVAL = 1, MRT_ENOMEM = 2, MRT_ECUDA = 3 };
enum mrt_match_mode { MRT_MATCH_CONDITIONAL = 0, MRT_MATCH_GLOBAL = 1 };

#define MRT_PAD_VALUE 114
#define MRT_MAX_WH 7680.0 /* class offset of class-aware NMS */

MRT_API int mrt_abi_version(void);
/* Message of the last error on this thread ("" when none). */
MRT_API const char *mrt_last_error(void);

/* Worker threads of the CPU ops that split work (letterbox of large frames, global matching): 0 (default)
 * = the online CPUs, at most 8. Process-wide. */
MRT_API void mrt_set_threads(int n);

/* ---------------------------------------------------------------------------------------- letterbox */
typedef struct {
    double r;        /* scale: min(S/h, S/w) */
    int new_w, new_h; /* resized image: max(round(w*r), 1), max(round(h*r), 1) (round half to even) */
    int left, top;   /* pad: round((S-new_w)/2 - 0.1), round((S-new_h)/2 - 0.1) */
} mrt_letterbox_params;

MRT_API int mrt_letterbox_plan(int h, int w, int size, mrt_letterbox_params *p);

/* uint8 BGR HWC frame (pixel stride 3 bytes, row stride `row_stride` bytes) -> RGB CHW (3, S, S) in
 * [0, 1], float32 (half=0) or IEEE float16 (half=1, out is uint16_t bits). One fused pass over the
 * output; values are rounded to the uint8 grid before /255 like cv2's uint8 resize. `p` may be NULL. */
MRT_API int mrt_letterbox(const uint8_t *bgr, int h, int w, ptrdiff_t row_stride, int size, int half, void *out,
                  mrt_letterbox_params *p);

/* mrt_letterbox with flags: MRT_LB_HALF (float16 output) and MRT_LB_KEEP_PAD (the pad area of `out` already
 * holds the pad value for this frame size and precision, from an earlier call into the same buffer: only
 * the resized image is written; a quarter less memory traffic for a 4:3 frame in a square input). */
#define MRT_LB_HALF 1
#define MRT_LB_KEEP_PAD 2
MRT_API int mrt_letterbox_ex(const uint8_t *bgr, int h, int w, ptrdiff_t row_stride, int size, int flags, void *out,
                     mrt_letterbox_params *p);

/* --------------------------------------------------------------------------------------- decode+NMS */
/* One image. box_dist (4*reg_max, A) DFL logits, cls_logits (nc, A) logits, both float32 contiguous.
 * shapes: nlevels (h, w) pairs, strides: nlevels floats, sum h*w == A (anchors level by level, row-major).
 * Keeps anchors whose best-class sigmoid score (float32) > conf, then only the max_nms best of them (top-k
 * by score, ties: lower anchor index first; the CUDA twin picks the same set), greedy class-aware NMS
 * (IoU > iou suppresses, class offset MRT_MAX_WH), at most max_det kept, sorted by score (ties: anchor
 * order). Non-finite inputs are dropped, never output: an anchor with a NaN class logit is no candidate
 * (+-inf logits are scores 1 and 0), a candidate whose decoded box is not finite (NaN/inf DFL logits) is
 * skipped by NMS (after the max_nms cut: it takes one of those places). Writes n <= max_det rows: boxes_lb (n, 4) xyxy letterbox pixels, boxes_frame (n, 4) xyxy frame
 * pixels ((b - pad) / gain per axis, clipped to [0, frame_w] x [0, frame_h]; gain_x = new_w / frame_w and
 * gain_y = new_h / frame_h with the letterbox's rounded size, as ultralytics 8.4's scale_boxes), scores (n,),
 * classes (n,). boxes_frame may be NULL (then the gains, pad and the frame size are not used). */
MRT_API int mrt_decode_nms(const float *box_dist, const float *cls_logits, int num_anchors, int reg_max, int nc,
                   const int *shapes, const float *strides, int nlevels, float conf, float iou, int max_det,
                   int max_nms, double gain_x, double gain_y, double pad_x, double pad_y, int frame_h,
                   int frame_w, float *boxes_frame, float *boxes_lb, float *scores, int64_t *classes, int *n_out);

/* ------------------------------------------------------------------------------------------- pooling */
/* box-area-mean/v2 of n boxes (xyxy letterbox pixels) over nlevels maps (C_i, H_i, W_i) float32:
 * out (n, sum C_i). Each map is piecewise constant over its cells; a box is clipped to the map, given
 * a minimum extent of 0.25 cell (centred, shifted inside) and averaged over its area. A box must be finite
 * (else MRT_EINVAL); a NaN/inf map cell makes the vectors of the boxes that cover it non-finite (only
 * theirs). */
MRT_API int mrt_pool(const float *const *maps, const int *chw, const float *strides, int nlevels, const float *boxes,
             int n, float *out);

/* ------------------------------------------------------------------------------------------ matching */
/* vectors (n, d) (L2-normalised here), prototypes (m, d) unit rows ((m, d_out) with a projection).
 * conditional: only prototypes whose class equals the detection's; global: all. idx = argmax cosine (first
 * on ties) or -1 when none is eligible (sim -inf) or the best is not finite (NaN input: sim NaN);
 * identity = idx if sim >= the threshold else -1 (thresholds[idx], m floats, when thresholds is not NULL;
 * else `threshold`). identity may be NULL. threads <= 0: automatic.
 * Vector centring (means not NULL, n_means >= 1): each vector x of class c becomes l2n(l2n(x) - means[r]),
 * means (n_means, d), r = c (per-class means; a class outside [0, n_means) is an error) or r = 0 when
 * n_means == 1 (one global mean); prototypes are given centred. means NULL / n_means 0: no centring.
 * Vectors are centred (and their classes checked) only when there are prototypes (m > 0).
 * Linear projection (proj not NULL, (d, d_out) row-major, d_out >= 1): after centring (or the first
 * normalisation), y = l2n(u @ proj), and matching happens in d_out dimensions against prototypes (m, d_out)
 * given projected. proj NULL: no projection, d_out ignored. The projection's rows may be split over threads
 * (same results for any thread count).
 * "Not NAME" corrections (negatives not NULL): unit rows (K, d) ((K, d_out) with a projection, the matching
 * space), CSR over the prototypes: prototype j's are rows neg_offsets[j] .. neg_offsets[j + 1] (m + 1 int32,
 * starting at 0, non-decreasing). A detection whose identity is j (after the threshold) becomes -1 when one
 * of j's corrections has a cosine strictly greater than j's prototype (both by one dot routine); idx and sim
 * stay the prototype's. No fallback to another prototype. negatives NULL: none (neg_offsets ignored). */
MRT_API int mrt_match(const float *vectors, int n, int d, const int64_t *det_cls, const float *prototypes, int m,
              const int64_t *proto_cls, int mode, const float *means, int n_means, const float *proj, int d_out,
              const float *thresholds, float threshold, const float *negatives, const int32_t *neg_offsets,
              int threads, int64_t *idx, float *sim, int64_t *identity);

/* ------------------------------------------------------------------------------- CUDA twins (device) */
/* Same rules, device pointers, asynchronous on `stream` (a cudaStream_t). Built only into
 * libmocha_rt_cuda. mrt_cuda_decode_nms needs a device workspace of mrt_cuda_decode_nms_workspace()
 * bytes (linear in the anchors, plus an IoU bitmask of min(A, max_nms)^2 bits: 2 MiB at max_nms 4096, the
 * Python default) and writes the detection count to the device int *n_out; shapes and strides are host
 * arrays. */
MRT_API int mrt_cuda_letterbox(const uint8_t *bgr, int h, int w, ptrdiff_t row_stride, int size, int half, void *out,
                       void *stream);
MRT_API size_t mrt_cuda_decode_nms_workspace(int num_anchors, int nc, int max_nms);
MRT_API int mrt_cuda_decode_nms(const float *box_dist, const float *cls_logits, int num_anchors, int reg_max, int nc,
                        const int *shapes, const float *strides, int nlevels, float conf, float iou,
                        int max_det, int max_nms, double gain_x, double gain_y, double pad_x, double pad_y, int frame_h,
                        int frame_w, void *workspace, size_t workspace_bytes, float *boxes_frame,
                        float *boxes_lb, float *scores, int64_t *classes, int *n_out, void *stream);
/* maps: host array of nlevels device pointers; chw, strides: host arrays; boxes, out: device. */
MRT_API int mrt_cuda_pool(const float *const *maps, const int *chw, const float *strides, int nlevels,
                  const float *boxes, int n, float *out, void *stream);
/* means, proj, thresholds, negatives, neg_offsets: device pointers (or NULL). A class outside [0, n_means)
 * cannot be reported synchronously: that detection gets idx -1, sim NaN, identity -1; neg_offsets cannot be
 * checked either (the caller's: m + 1 entries from 0, non-decreasing). d + d_out floats of shared memory per
 * block: at most 10240 in all. */
MRT_API int mrt_cuda_match(const float *vectors, int n, int d, const int64_t *det_cls, const float *prototypes, int m,
                   const int64_t *proto_cls, int mode, const float *means, int n_means, const float *proj,
                   int d_out, const float *thresholds, float threshold, const float *negatives,
                   const int32_t *neg_offsets, int64_t *idx, float *sim, int64_t *identity, void *stream);
/* The archs the CUDA library was built for (e.g. "sm_87;sm_110"). */
MRT_API const char *mrt_cuda_archs(void);

#ifdef __cplusplus
}
#endif
#endif /* MOCHA_RT_H */
