/* Quantised ops ONNX Runtime's CPU provider lacks, as custom ops of domain `ai.mocha_edge`:
 *   QSiLU    - a fused quantised SiLU (below);
 *   QRequant - a uint8 tensor moved to another scale/zero-point by a byte table (before a uint8 Concat,
 *              in place of ONNX Runtime's QLinearConcat, which requantises with a scalar table);
 *   QMaxPool - max pooling of uint8 NCHW tensors, stride 1, square odd kernel k, pad k / 2 (YOLO's SPPF):
 *              separable (row maxima, then column maxima), exact; ONNX Runtime's own uint8 MaxPool runs
 *              these 8x8x128 tensors at ~90 us each (measured), channels-last it needs a layout pass that
 *              costs more than it saves once QSiLU is in the graph (export/fuse.py).
 *
 * QSiLU:
 *
 * ONNX Runtime has no quantised SiLU: a Q/DQ graph runs x * sigmoid(x) as QLinearSigmoid (a scalar table
 * lookup) + QLinearMul, two passes that do not use a second core (measured: a third of the INT8 graph's
 * time on 2 cores). SiLU of a uint8 tensor is a function of the byte alone, so this op is one 256-entry
 * table, built once per node from the node's attributes, applied with AVX-512 VBMI byte permutes where the
 * CPU has them (64 bytes per 4 instructions), scalar elsewhere. Table entry q:
 *   x = x_scale * (q - x_zero_point);  y = x / (1 + exp(-x));
 *   out = saturate_uint8(round_half_even(y / y_scale) + y_zero_point)
 * i.e. DequantizeLinear -> SiLU in float -> QuantizeLinear with one rounding, as TensorRT's fused
 * convolution + SiLU computes it, where the unfused graph rounds sigmoid(x) to uint8 first.
 *
 * ONNX Runtime loads this library (SessionOptions.register_custom_ops_library) and calls RegisterCustomOps
 * with its API table. No ONNX Runtime header is needed or used: the few calls are reached by their slot in
 * the append-only `OrtApi` function table of API version 1 (ONNX Runtime >= 1.0), and the op is described
 * with the layout of `OrtCustomOp` (a version field, the nine version-1 callbacks and the later ones). The slot numbers are
 * checked against the installed ONNX Runtime by tests/test_qsilu.py (outside a kernel, through ctypes).
 *
 * Errors: the ops are declared at OrtCustomOp version 16 (ONNX Runtime >= 1.16) with the status-returning
 * CreateKernelV2 / KernelComputeV2, so every failure inside a kernel (a bad attribute, an input of the wrong
 * rank or size, a failed ONNX Runtime call, no memory) is an OrtStatus "mocha_edge <op>: <problem>": ONNX
 * Runtime fails the session (a bad attribute) or the run with it, and Python's session.run raises it. A
 * kernel that returns success has written its output. (An ONNX Runtime older than 1.16 refuses the ops when
 * the session is made; the fused graph then falls back to the standard one, export/fuse.py.)
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QSILU_VBMI 1
#endif

typedef void OrtStatus; /* opaque ONNX Runtime handles */
typedef void OrtKernelInfo;
typedef void OrtKernelContext;
typedef void OrtValue;
typedef void OrtShapeInfo;
typedef void OrtDomain;
typedef void OrtSessionOptions;

/* OrtApi slots (API version 1, append-only) */
enum {
    SLOT_CREATE_STATUS = 0,
    SLOT_GET_ERROR_CODE = 1,
    SLOT_GET_ERROR_MESSAGE = 2,
    SLOT_CREATE_CUSTOM_OP_DOMAIN = 26,
    SLOT_CUSTOM_OP_DOMAIN_ADD = 27,
    SLOT_ADD_CUSTOM_OP_DOMAIN = 28,
    SLOT_GET_TENSOR_MUTABLE_DATA = 51,
    SLOT_GET_DIMENSIONS_COUNT = 61,
    SLOT_GET_DIMENSIONS = 62,
    SLOT_GET_TENSOR_SHAPE_ELEMENT_COUNT = 64,
    SLOT_GET_TENSOR_TYPE_AND_SHAPE = 65,
    SLOT_KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
    SLOT_KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
    SLOT_KERNEL_CONTEXT_GET_INPUT = 90,
    SLOT_KERNEL_CONTEXT_GET_OUTPUT = 91,
    SLOT_RELEASE_STATUS = 93,
    SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};

typedef struct {
    const void *const *(*get_api)(uint32_t version);
    const char *(*get_version_string)(void);
} mrt_ort_api_base;

typedef const void *const *ort_api; /* the OrtApi function table */
#define ORT_FN(api, slot, type) ((type)(api)[slot])

enum { ORT_CODE_FAIL = 1, ORT_CODE_INVALID_ARGUMENT = 2 }; /* OrtErrorCode values */
#define MRT_ORT_OP_VERSION 16                              /* the first with CreateKernelV2 / KernelComputeV2 */

/* OrtCustomOp up to the fields of version 17, followed by zeroed room in case a runtime reads further fields.
 * ONNX Runtime calls the V2 create/compute callbacks (status-returning) when they are set and the version is
 * >= 16; the version-1 ones are left NULL. */
typedef struct mrt_ort_custom_op {
    uint32_t version;
    void *(*create_kernel)(const struct mrt_ort_custom_op *op, ort_api api, const OrtKernelInfo *info);
    const char *(*get_name)(const struct mrt_ort_custom_op *op);
    const char *(*get_execution_provider_type)(const struct mrt_ort_custom_op *op);
    int (*get_input_type)(const struct mrt_ort_custom_op *op, size_t index);
    size_t (*get_input_type_count)(const struct mrt_ort_custom_op *op);
    int (*get_output_type)(const struct mrt_ort_custom_op *op, size_t index);
    size_t (*get_output_type_count)(const struct mrt_ort_custom_op *op);
    void (*kernel_compute)(void *kernel, OrtKernelContext *context);
    void (*kernel_destroy)(void *kernel);
    /* later versions */
    int (*get_input_characteristic)(const struct mrt_ort_custom_op *op, size_t index);
    int (*get_output_characteristic)(const struct mrt_ort_custom_op *op, size_t index);
    int (*get_input_memory_type)(const struct mrt_ort_custom_op *op, size_t index);
    int (*get_variadic_input_min_arity)(const struct mrt_ort_custom_op *op);
    int (*get_variadic_input_homogeneity)(const struct mrt_ort_custom_op *op);
    int (*get_variadic_output_min_arity)(const struct mrt_ort_custom_op *op);
    int (*get_variadic_output_homogeneity)(const struct mrt_ort_custom_op *op);
    OrtStatus *(*create_kernel_v2)(const struct mrt_ort_custom_op *op, ort_api api, const OrtKernelInfo *info,
                                   void **kernel);
    OrtStatus *(*kernel_compute_v2)(void *kernel, OrtKernelContext *context);
    void *infer_output_shape;
    int (*get_start_version)(const struct mrt_ort_custom_op *op);
    int (*get_end_version)(const struct mrt_ort_custom_op *op);
    void *reserved[32];
} mrt_ort_custom_op;

#define ONNX_UINT8 2

static ort_api registered_api; /* the table RegisterCustomOps got (errors of a kernel that does not exist) */

/* An error status "mocha_edge <op>: <message>" for ONNX Runtime to raise. */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static OrtStatus *op_error(ort_api api, int code, const char *op, const char *fmt, ...) {
    char msg[512];
    int k = snprintf(msg, sizeof msg, "mocha_edge %s: ", op);
    if (k < 0 || (size_t)k >= sizeof msg) k = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + k, sizeof msg - (size_t)k, fmt, ap);
    va_end(ap);
    return ORT_FN(api, SLOT_CREATE_STATUS, OrtStatus *(*)(int, const char *))(code, msg);
}

/* A failed ONNX Runtime call inside a kernel (st not NULL): the same error code, a message naming the op and
 * the call; st is released. NULL (success) passes through. */
static OrtStatus *ort_call(ort_api api, OrtStatus *st, const char *op, const char *what) {
    if (st == NULL) return NULL;
    const int code = ORT_FN(api, SLOT_GET_ERROR_CODE, int (*)(const OrtStatus *))(st);
    const char *msg = ORT_FN(api, SLOT_GET_ERROR_MESSAGE, const char *(*)(const OrtStatus *))(st);
    OrtStatus *out = op_error(api, code > 0 ? code : ORT_CODE_FAIL, op, "%s failed: %s", what, msg ? msg : "?");
    ORT_FN(api, SLOT_RELEASE_STATUS, void (*)(OrtStatus *))(st);
    return out;
}

#define ORT_TRY(expr)                     \
    do {                                  \
        OrtStatus *st_ = (expr);          \
        if (st_ != NULL) return st_;      \
    } while (0)

typedef struct {
    ort_api api;
    const char *name; /* the op, for error messages */
    uint8_t lut[256];
} qsilu_kernel;

/* 1 when the byte-table kernel uses AVX-512 VBMI on this CPU (for `info` and the tests). */
MRT_API int mrt_qsilu_vbmi(void) {
#ifdef QSILU_VBMI
    static int have = -1;
    if (have < 0) have = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
    return have;
#else
    return 0;
#endif
}

/* The table of one node (see the file comment); exposed for tests as mrt_qsilu_table. */
MRT_API void mrt_qsilu_table(float x_scale, int x_zero_point, float y_scale, int y_zero_point, uint8_t lut[256]) {
    for (int q = 0; q < 256; q++) {
        const float x = x_scale * (float)(q - x_zero_point);
        const float y = x / (1.0f + expf(-x));
        const float v = nearbyintf(y / y_scale) + (float)y_zero_point; /* default rounding: half to even */
        lut[q] = (uint8_t)(v < 0.f ? 0.f : (v > 255.f ? 255.f : v));
    }
}

#ifdef QSILU_VBMI
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static void lut_vbmi(const uint8_t *lut, const uint8_t *x,
                                                                          uint8_t *y, size_t n) {
    const __m512i t0 = _mm512_loadu_si512(lut), t1 = _mm512_loadu_si512(lut + 64);
    const __m512i t2 = _mm512_loadu_si512(lut + 128), t3 = _mm512_loadu_si512(lut + 192);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i v = _mm512_loadu_si512(x + i);
        const __m512i lo = _mm512_permutex2var_epi8(t0, v, t1), hi = _mm512_permutex2var_epi8(t2, v, t3);
        _mm512_storeu_si512(y + i, _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi));
    }
    if (i < n) {
        const __mmask64 m = (__mmask64)((~0ULL) >> (64 - (n - i)));
        const __m512i v = _mm512_maskz_loadu_epi8(m, x + i);
        const __m512i lo = _mm512_permutex2var_epi8(t0, v, t1), hi = _mm512_permutex2var_epi8(t2, v, t3);
        _mm512_mask_storeu_epi8(y + i, m, _mm512_mask_blend_epi8(_mm512_movepi8_mask(v), lo, hi));
    }
}
#endif

/* Apply a 256-entry byte table: y[i] = lut[x[i]] (exposed for tests as mrt_lut_u8). */
MRT_API void mrt_lut_u8(const uint8_t *lut, const uint8_t *x, uint8_t *y, size_t n) {
#ifdef QSILU_VBMI
    if (mrt_qsilu_vbmi()) {
        lut_vbmi(lut, x, y, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) y[i] = lut[x[i]];
}

/* The table of a requantisation from (x_scale, x_zero_point) to (y_scale, y_zero_point), one rounding
 * (exposed for tests as mrt_requant_table). */
MRT_API void mrt_requant_table(float x_scale, int x_zero_point, float y_scale, int y_zero_point, uint8_t lut[256]) {
    for (int q = 0; q < 256; q++) {
        const float v = nearbyintf(x_scale * (float)(q - x_zero_point) / y_scale) + (float)y_zero_point;
        lut[q] = (uint8_t)(v < 0.f ? 0.f : (v > 255.f ? 255.f : v));
    }
}

typedef void (*table_builder)(float, int, float, int, uint8_t *);

/* A byte-table kernel from the node's x/y scale and zero-point attributes (scales finite and positive, zero
 * points 0..255: a uint8 quantisation). */
static OrtStatus *table_create(ort_api api, const OrtKernelInfo *info, const char *op, table_builder build,
                               void **kernel) {
    typedef OrtStatus *(*get_f)(const OrtKernelInfo *, const char *, float *);
    typedef OrtStatus *(*get_i)(const OrtKernelInfo *, const char *, int64_t *);
    get_f float_attr = ORT_FN(api, SLOT_KERNEL_INFO_GET_ATTRIBUTE_FLOAT, get_f);
    get_i int_attr = ORT_FN(api, SLOT_KERNEL_INFO_GET_ATTRIBUTE_INT64, get_i);
    float xs = 0.f, ys = 0.f;
    int64_t xz = 0, yz = 0;
    *kernel = NULL;
    ORT_TRY(ort_call(api, float_attr(info, "x_scale", &xs), op, "attribute x_scale"));
    ORT_TRY(ort_call(api, int_attr(info, "x_zero_point", &xz), op, "attribute x_zero_point"));
    ORT_TRY(ort_call(api, float_attr(info, "y_scale", &ys), op, "attribute y_scale"));
    ORT_TRY(ort_call(api, int_attr(info, "y_zero_point", &yz), op, "attribute y_zero_point"));
    if (!(isfinite(xs) && xs > 0.f && isfinite(ys) && ys > 0.f))
        return op_error(api, ORT_CODE_INVALID_ARGUMENT, op, "scales x_scale %g, y_scale %g must be finite and > 0",
                        (double)xs, (double)ys);
    if (xz < 0 || xz > 255 || yz < 0 || yz > 255)
        return op_error(api, ORT_CODE_INVALID_ARGUMENT, op, "zero points %lld, %lld outside 0..255 (uint8)",
                        (long long)xz, (long long)yz);
    qsilu_kernel *k = calloc(1, sizeof *k);
    if (k == NULL) return op_error(api, ORT_CODE_FAIL, op, "out of memory");
    k->api = api, k->name = op;
    build(xs, (int)xz, ys, (int)yz, k->lut);
    *kernel = k;
    return NULL;
}

static OrtStatus *qsilu_create(const mrt_ort_custom_op *op, ort_api api, const OrtKernelInfo *info, void **kernel) {
    return (void)op, table_create(api, info, "QSiLU", mrt_qsilu_table, kernel);
}

static OrtStatus *qrequant_create(const mrt_ort_custom_op *op, ort_api api, const OrtKernelInfo *info,
                                  void **kernel) {
    return (void)op, table_create(api, info, "QRequant", mrt_requant_table, kernel);
}

/* The kernels' common start: input 0, an output 1 of its shape, both data pointers, the shape and the
 * element count. `want_nd`: the dimensions the op takes (0: any, up to 16). NULL on success, else the error
 * (the output may then be unwritten: the run fails). */
static OrtStatus *same_shape_io(ort_api api, OrtKernelContext *ctx, const char *op, size_t want_nd, void **x,
                                void **y, int64_t dims[16], size_t *nd, size_t *n) {
    typedef OrtStatus *(*get_input_f)(const OrtKernelContext *, size_t, const OrtValue **);
    typedef OrtStatus *(*get_output_f)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
    typedef OrtStatus *(*data_f)(OrtValue *, void **);
    const OrtValue *in = NULL;
    OrtValue *out = NULL;
    OrtShapeInfo *shape = NULL;
    ORT_TRY(ort_call(api, ORT_FN(api, SLOT_KERNEL_CONTEXT_GET_INPUT, get_input_f)(ctx, 0, &in), op, "GetInput"));
    if (in == NULL) return op_error(api, ORT_CODE_INVALID_ARGUMENT, op, "input 0 is missing");
    ORT_TRY(ort_call(api, ORT_FN(api, SLOT_GET_TENSOR_TYPE_AND_SHAPE, OrtStatus *(*)(const OrtValue *, OrtShapeInfo **))(in, &shape), op, "GetTensorTypeAndShape"));
    OrtStatus *st = ort_call(api, ORT_FN(api, SLOT_GET_DIMENSIONS_COUNT, OrtStatus *(*)(const OrtShapeInfo *, size_t *))(shape, nd), op, "GetDimensionsCount");
    if (st == NULL && (*nd > 16 || (want_nd && *nd != want_nd)))
        st = op_error(api, ORT_CODE_INVALID_ARGUMENT, op, "input has %zu dimensions (%s)", *nd,
                      want_nd ? "NCHW expected" : "at most 16");
    if (st == NULL)
        st = ort_call(api, ORT_FN(api, SLOT_GET_DIMENSIONS, OrtStatus *(*)(const OrtShapeInfo *, int64_t *, size_t))(shape, dims, *nd), op, "GetDimensions");
    if (st == NULL)
        st = ort_call(api, ORT_FN(api, SLOT_GET_TENSOR_SHAPE_ELEMENT_COUNT, OrtStatus *(*)(const OrtShapeInfo *, size_t *))(shape, n), op, "GetTensorShapeElementCount");
    ORT_FN(api, SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, void (*)(OrtShapeInfo *))(shape);
    if (st != NULL) return st;
    ORT_TRY(ort_call(api, ORT_FN(api, SLOT_KERNEL_CONTEXT_GET_OUTPUT, get_output_f)(ctx, 0, dims, *nd, &out), op, "GetOutput"));
    ORT_TRY(ort_call(api, ORT_FN(api, SLOT_GET_TENSOR_MUTABLE_DATA, data_f)((OrtValue *)in, x), op, "input data"));
    ORT_TRY(ort_call(api, ORT_FN(api, SLOT_GET_TENSOR_MUTABLE_DATA, data_f)(out, y), op, "output data"));
    if (*n > 0 && (*x == NULL || *y == NULL))
        return op_error(api, ORT_CODE_FAIL, op, "no data behind a tensor of %zu elements", *n);
    return NULL;
}

/* QSiLU and QRequant: the node's byte table over the tensor. */
static OrtStatus *table_compute(void *kernel, OrtKernelContext *ctx) {
    qsilu_kernel *k = kernel;
    void *x = NULL, *y = NULL;
    int64_t dims[16];
    size_t nd = 0, n = 0;
    if (k == NULL) return op_error(registered_api, ORT_CODE_FAIL, "byte-table op", "kernel was not created");
    ORT_TRY(same_shape_io(k->api, ctx, k->name, 0, &x, &y, dims, &nd, &n));
    mrt_lut_u8(k->lut, x, y, n);
    return NULL;
}

static void qsilu_destroy(void *kernel) { free(kernel); }
static const char *qsilu_name(const mrt_ort_custom_op *op) { return (void)op, "QSiLU"; }
static const char *qsilu_provider(const mrt_ort_custom_op *op) { return (void)op, "CPUExecutionProvider"; }
static int qsilu_type(const mrt_ort_custom_op *op, size_t i) { return (void)op, (void)i, ONNX_UINT8; }
static size_t qsilu_count(const mrt_ort_custom_op *op) { return (void)op, 1; }

/* required input/output (0), default memory (0), one homogeneous element, opset 1 onwards */
static int qsilu_zero(const mrt_ort_custom_op *op, size_t i) { return (void)op, (void)i, 0; }
static int qsilu_one(const mrt_ort_custom_op *op) { return (void)op, 1; }
static int qsilu_end(const mrt_ort_custom_op *op) { return (void)op, 0x7fffffff; }

/* Declared at version 16 with the status-returning V2 create/compute (see the file comment); every callback
 * up to version 17 is filled, because ONNX Runtime 1.32 calls the input/output characteristic callbacks
 * whatever the version says (found the hard way: a NULL call). */
#define MRT_ORT_OP(create, name, compute)                                                                       \
    {MRT_ORT_OP_VERSION, NULL, name, qsilu_provider, qsilu_type, qsilu_count, qsilu_type, qsilu_count, NULL,     \
     qsilu_destroy, qsilu_zero, qsilu_zero, qsilu_zero, qsilu_one, qsilu_one, qsilu_one, qsilu_one, create,     \
     compute, NULL, qsilu_one, qsilu_end, {0}}

static mrt_ort_custom_op qsilu_op = MRT_ORT_OP(qsilu_create, qsilu_name, table_compute);

/* ---------------------------------------------------------------------------------------- QMaxPool */
typedef struct {
    ort_api api;
    int k;
} qmaxpool_kernel;

#define QMAXPOOL "QMaxPool"

/* Max over a k x k window (pad k / 2, stride 1, out-of-range taps ignored) of each of `planes` h x w uint8
 * planes; `tmp` holds one plane. Exposed for tests as mrt_maxpool_u8. */
MRT_API void mrt_maxpool_u8(const uint8_t *x, uint8_t *y, uint8_t *tmp, size_t planes, int h, int w, int k) {
    const int p = k / 2;
    for (size_t c = 0; c < planes; c++) {
        const uint8_t *in = x + c * (size_t)h * w;
        uint8_t *out = y + c * (size_t)h * w;
        for (int r = 0; r < h; r++)
            for (int col = 0; col < w; col++) {
                const int a = col - p < 0 ? 0 : col - p, b = col + p >= w ? w - 1 : col + p;
                uint8_t m = in[r * w + a];
                for (int i = a + 1; i <= b; i++) m = in[r * w + i] > m ? in[r * w + i] : m;
                tmp[r * w + col] = m;
            }
        for (int r = 0; r < h; r++) {
            const int a = r - p < 0 ? 0 : r - p, b = r + p >= h ? h - 1 : r + p;
            memcpy(out + (size_t)r * w, tmp + (size_t)a * w, (size_t)w);
            for (int i = a + 1; i <= b; i++)
                for (int col = 0; col < w; col++) {
                    const uint8_t v = tmp[(size_t)i * w + col];
                    if (v > out[(size_t)r * w + col]) out[(size_t)r * w + col] = v;
                }
        }
    }
}

static OrtStatus *qmaxpool_create(const mrt_ort_custom_op *op, ort_api api, const OrtKernelInfo *info,
                                  void **kernel) {
    (void)op;
    int64_t k = 0;
    *kernel = NULL;
    ORT_TRY(ort_call(api, ORT_FN(api, SLOT_KERNEL_INFO_GET_ATTRIBUTE_INT64, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *))(info, "k", &k), QMAXPOOL, "attribute k"));
    if (k < 1 || k % 2 == 0 || k > 255)
        return op_error(api, ORT_CODE_INVALID_ARGUMENT, QMAXPOOL, "kernel k = %lld must be odd, 1..255", (long long)k);
    qmaxpool_kernel *kern = calloc(1, sizeof *kern);
    if (kern == NULL) return op_error(api, ORT_CODE_FAIL, QMAXPOOL, "out of memory");
    kern->api = api, kern->k = (int)k;
    *kernel = kern;
    return NULL;
}

static OrtStatus *qmaxpool_compute(void *kernel, OrtKernelContext *ctx) {
    qmaxpool_kernel *k = kernel;
    void *x = NULL, *y = NULL;
    int64_t dims[16];
    size_t nd = 0, n = 0;
    if (k == NULL) return op_error(registered_api, ORT_CODE_FAIL, QMAXPOOL, "kernel was not created");
    ORT_TRY(same_shape_io(k->api, ctx, QMAXPOOL, 4, &x, &y, dims, &nd, &n));
    if (n == 0) return NULL; /* an empty tensor: nothing to write */
    if (dims[2] * dims[3] > INT_MAX)
        return op_error(k->api, ORT_CODE_INVALID_ARGUMENT, QMAXPOOL, "plane %lld x %lld too large",
                        (long long)dims[2], (long long)dims[3]);
    const int h = (int)dims[2], w = (int)dims[3];
    uint8_t *tmp = malloc((size_t)h * w);
    if (tmp == NULL) return op_error(k->api, ORT_CODE_FAIL, QMAXPOOL, "out of memory (a %d x %d plane)", h, w);
    mrt_maxpool_u8(x, y, tmp, (size_t)(dims[0] * dims[1]), h, w, k->k);
    free(tmp);
    return NULL;
}

static const char *qmaxpool_name(const mrt_ort_custom_op *op) { return (void)op, "QMaxPool"; }
static const char *qrequant_name(const mrt_ort_custom_op *op) { return (void)op, "QRequant"; }

/* QRequant: the QSiLU kernel with a requantisation table. Before a uint8 Concat whose inputs have other
 * scales than its output (ONNX Runtime's QLinearConcat requantises them with a scalar table). */
static mrt_ort_custom_op qrequant_op = MRT_ORT_OP(qrequant_create, qrequant_name, table_compute);

static mrt_ort_custom_op qmaxpool_op = MRT_ORT_OP(qmaxpool_create, qmaxpool_name, qmaxpool_compute);

#define MRT_ORT_DOMAIN "ai.mocha_edge"

/* The entry point ONNX Runtime looks for in a custom-op library. */
MRT_API OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const mrt_ort_api_base *base) {
    ort_api api = base->get_api(1);
    registered_api = api;
    OrtDomain *domain = NULL; /* lives as long as the process: sessions keep using it */
    OrtStatus *st = ORT_FN(api, SLOT_CREATE_CUSTOM_OP_DOMAIN, OrtStatus *(*)(const char *, OrtDomain **))(MRT_ORT_DOMAIN, &domain);
    if (st) return st;
    st = ORT_FN(api, SLOT_CUSTOM_OP_DOMAIN_ADD, OrtStatus *(*)(OrtDomain *, const mrt_ort_custom_op *))(domain, &qsilu_op);
    if (st) return st;
    st = ORT_FN(api, SLOT_CUSTOM_OP_DOMAIN_ADD, OrtStatus *(*)(OrtDomain *, const mrt_ort_custom_op *))(domain, &qmaxpool_op);
    if (st) return st;
    st = ORT_FN(api, SLOT_CUSTOM_OP_DOMAIN_ADD, OrtStatus *(*)(OrtDomain *, const mrt_ort_custom_op *))(domain, &qrequant_op);
    if (st) return st;
    return ORT_FN(api, SLOT_ADD_CUSTOM_OP_DOMAIN, OrtStatus *(*)(OrtSessionOptions *, OrtDomain *))(options, domain);
}

