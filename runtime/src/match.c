/* L2-normalise (+ optional vector centring, + optional linear projection) + cosine nearest prototype
 * (mocha_edge.prototypes.match), conditional or global; identity by one threshold or per-prototype thresholds
 * (prototypes.decide).
 *
 * The projection y = u @ proj runs in a PR x PJ register-blocked kernel (PR detection rows at a time, PJ
 * output columns vectorised, contiguous in proj; FMA contraction allowed there too); its rows may be split
 * over threads (threads > 1, or mrt_set_threads), every row computed the same way whatever the split.
 *
 * Conditional mode groups detections and prototypes by class, so only same-class dot products are made.
 * Dot products run in a 4 x 2 register-blocked kernel (vectorised over D with an OpenMP-SIMD reduction,
 * no -ffast-math; FMA contraction allowed in that kernel only), prototypes in L2-sized chunks; large global
 * problems can be split over threads (the threads argument or mrt_set_threads) by prototype range and
 * merged with the same first-index tie rule.
 *
 * "Not NAME" corrections (prototypes.refuse): a detection given identity j stays j only while none of j's
 * corrections (CSR rows neg_offsets[j] .. neg_offsets[j + 1]) is nearer it than j's prototype; both cosines are
 * taken by one dot routine (dot_row), so a correction equal to the prototype refuses nothing. Cost: k_j + 1
 * dot products per named detection.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define CHUNK 48                  /* prototypes per cache block (48 x 448 x 4 B = 86 KB) */
#define THREAD_WORK (4L << 20)    /* multiply-adds below which one thread is used */
#define MAX_THREADS 8
#define PR 4                      /* projection: detection rows per register block */
#define PJ 16                     /* projection: output columns per block (16 accumulators of AVX2 or NEON) */

/* y = x / max(|x|, 1e-12) (norm accumulated in float64 over SIMD lanes; NaN kept); y may be x. */
MRT_CLONES static void l2n_row(const float *x, float *y, int d) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int k = 0; k < d; k++) s += (double)x[k] * x[k];
    float nrm = (float)sqrt(s);
    if (!(nrm >= 1e-12f) && nrm == nrm) nrm = 1e-12f;
    for (int k = 0; k < d; k++) y[k] = x[k] / nrm;
}

/* sum_k a[k] * b[k] in float32, in one fixed order for a given d (a prototype and its corrections alike). */
MRT_CLONES static float dot_row(const float *restrict a, const float *restrict b, int d) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int k = 0; k < d; k++) s += a[k] * b[k];
    return s;
}

typedef struct {
    float best;
    int idx; /* -1: nothing eligible seen yet */
    int nan;
} best_t;

static inline void take(best_t *b, float s, int j) {
    if (s != s)
        b->nan = 1;
    else if (b->idx < 0 || s > b->best)
        b->best = s, b->idx = j;
}

/* Contracting a * b + s into an FMA is allowed here (only here): a dot product has no NaN subtlety. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=fast")))
#endif
MRT_CLONES_AVX512
static void dot4x2(const float *restrict a0, const float *restrict a1, const float *restrict a2,
                   const float *restrict a3, const float *restrict b0, const float *restrict b1, int d,
                   float *restrict out) {
    float s00 = 0, s01 = 0, s10 = 0, s11 = 0, s20 = 0, s21 = 0, s30 = 0, s31 = 0;
#pragma omp simd reduction(+ : s00, s01, s10, s11, s20, s21, s30, s31)
    for (int i = 0; i < d; i++) {
        const float x = b0[i], y = b1[i];
        s00 += a0[i] * x, s01 += a0[i] * y;
        s10 += a1[i] * x, s11 += a1[i] * y;
        s20 += a2[i] * x, s21 += a2[i] * y;
        s30 += a3[i] * x, s31 += a3[i] * y;
    }
    out[0] = s00, out[1] = s01, out[2] = s10, out[3] = s11;
    out[4] = s20, out[5] = s21, out[6] = s30, out[7] = s31;
}

/* y[r][j0 .. j0 + PJ) = x[r] @ proj[:, j0 .. j0 + PJ) for PR rows (rows may repeat); k in ascending order. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=fast")))
#endif
MRT_CLONES_AVX512
static void proj_block(const float *const *x, int d, const float *restrict proj, int d_out, int j0,
                       float *const *y) {
    float acc[PR][PJ];
    for (int r = 0; r < PR; r++)
        for (int j = 0; j < PJ; j++) acc[r][j] = 0.f;
    for (int k = 0; k < d; k++) {
        const float *restrict pk = proj + (size_t)k * d_out + j0;
        float xk[PR];
        for (int r = 0; r < PR; r++) xk[r] = x[r][k];
#pragma omp simd
        for (int j = 0; j < PJ; j++) {
            const float pj = pk[j];
            for (int r = 0; r < PR; r++) acc[r][j] += xk[r] * pj;
        }
    }
    for (int r = 0; r < PR; r++)
        for (int j = 0; j < PJ; j++) y[r][j0 + j] = acc[r][j];
}

/* The columns [j0, d_out) left over by proj_block (fewer than PJ), one row at a time, k ascending. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=fast")))
#endif
MRT_CLONES_AVX512
static void proj_tail(const float *restrict x, int d, const float *restrict proj, int d_out, int j0,
                      float *restrict y) {
    for (int j = j0; j < d_out; j++) y[j] = 0.f;
    for (int k = 0; k < d; k++) {
        const float xk = x[k];
        const float *restrict pk = proj + (size_t)k * d_out;
#pragma omp simd
        for (int j = j0; j < d_out; j++) y[j] += xk * pk[j];
    }
}

/* The matching space of vectors rows [lo, hi) (mocha_edge.prototypes.centre_vectors): vn = l2n(x), centred
 * vn = l2n(vn - mean); with proj, y = l2n(vn @ proj). */
typedef struct {
    const float *vectors;
    int d;
    const int64_t *det_cls;
    const float *means; /* NULL: no centring */
    int n_means;
    const float *proj; /* NULL: no projection */
    int d_out;
    float *vn, *y;
    int lo, hi;
} prep_t;

static void *prep_run(void *arg) {
    const prep_t *a = arg;
    const int d = a->d, d_out = a->d_out;
    for (int i = a->lo; i < a->hi; i++) {
        float *u = a->vn + (size_t)i * d;
        l2n_row(a->vectors + (size_t)i * d, u, d);
        if (a->means) {
            const float *mu = a->means + (size_t)(a->n_means > 1 ? a->det_cls[i] : 0) * d;
            for (int k = 0; k < d; k++) u[k] -= mu[k];
            l2n_row(u, u, d);
        }
    }
    if (!a->proj) return NULL;
    const int jb = d_out / PJ * PJ; /* columns done in PJ-wide blocks */
    for (int i = a->lo; i < a->hi; i += PR) {
        const int ni = a->hi - i < PR ? a->hi - i : PR;
        const float *x[PR];
        float *y[PR];
        for (int r = 0; r < PR; r++) { /* a short last block repeats its last row (same values written) */
            const int ri = i + (r < ni ? r : ni - 1);
            x[r] = a->vn + (size_t)ri * d, y[r] = a->y + (size_t)ri * d_out;
        }
        for (int j0 = 0; j0 < jb; j0 += PJ) proj_block(x, d, a->proj, d_out, j0, y);
        if (jb < d_out)
            for (int r = 0; r < ni; r++) proj_tail(x[r], d, a->proj, d_out, jb, y[r]);
        for (int r = 0; r < ni; r++) l2n_row(y[r], y[r], d_out);
    }
    return NULL;
}

/* best[i] over prototypes rows[p_lo..p_hi) (ascending index order) for detection rows det[0..nd). */
static void block_match(const float *const *det, int nd, const float *const *pro, const int *pidx, int np, int d,
                        best_t *const *best) {
    float out[8];
    for (int p0 = 0; p0 < np; p0 += CHUNK) {
        const int p1 = p0 + CHUNK < np ? p0 + CHUNK : np;
        for (int i = 0; i < nd; i += 4) {
            const int ni = nd - i < 4 ? nd - i : 4;
            const float *a[4];
            for (int r = 0; r < 4; r++) a[r] = det[i + (r < ni ? r : ni - 1)];
            for (int j = p0; j < p1; j += 2) {
                const int nj = p1 - j < 2 ? p1 - j : 2;
                dot4x2(a[0], a[1], a[2], a[3], pro[j], pro[j + nj - 1], d, out);
                for (int r = 0; r < ni; r++)
                    for (int c = 0; c < nj; c++) take(best[i + r], out[2 * r + c], pidx[j + c]);
            }
        }
    }
}

typedef struct {
    const float *const *det;
    int nd;
    const float *const *pro;
    const int *pidx;
    int np, d;
    best_t *const *best;
} job_t;

static void *job_run(void *arg) {
    job_t *j = arg;
    block_match(j->det, j->nd, j->pro, j->pidx, j->np, j->d, j->best);
    return NULL;
}

typedef struct {
    int64_t cls;
    int idx;
} pkey_t;

static int key_cmp(const void *pa, const void *pb) {
    const pkey_t *a = pa, *b = pb;
    if (a->cls != b->cls) return a->cls < b->cls ? -1 : 1;
    return (a->idx > b->idx) - (a->idx < b->idx);
}

int mrt_match(const float *vectors, int n, int d, const int64_t *det_cls, const float *prototypes, int m,
              const int64_t *proto_cls, int mode, const float *means, int n_means, const float *proj, int d_out,
              const float *thresholds, float threshold, const float *negatives, const int32_t *neg_offsets,
              int threads, int64_t *idx, float *sim, int64_t *identity) {
    MRT_CHECK(n >= 0 && m >= 0 && d >= 1, "bad sizes n=%d m=%d d=%d", n, m, d);
    MRT_CHECK(mode == MRT_MATCH_CONDITIONAL || mode == MRT_MATCH_GLOBAL, "matching mode %d unknown", mode);
    MRT_CHECK(n == 0 || (vectors && idx && sim), "null pointer argument");
    MRT_CHECK(m == 0 || prototypes, "null prototypes");
    MRT_CHECK(mode == MRT_MATCH_GLOBAL || n == 0 || m == 0 || (det_cls && proto_cls), "null class arrays");
    MRT_CHECK(n_means >= 0 && (n_means == 0 || means), "bad vector centring means (n_means=%d)", n_means);
    MRT_CHECK(!proj || d_out >= 1, "bad projection output size d_out=%d", d_out);
    MRT_CHECK(!negatives || neg_offsets, "corrections without their offsets");
    if (negatives) { /* CSR over the m prototypes */
        MRT_CHECK(neg_offsets[0] == 0, "corrections offsets start at %d, not 0", neg_offsets[0]);
        for (int j = 0; j < m; j++)
            MRT_CHECK(neg_offsets[j + 1] >= neg_offsets[j], "corrections offsets decrease at prototype %d (%d -> %d)",
                      j, neg_offsets[j], neg_offsets[j + 1]);
    }
    const int centre = means && n_means > 0 && m > 0; /* nothing to match: the reference skips centring */
    MRT_CHECK(!centre || n_means == 1 || n == 0 || det_cls, "null class array (per-class means)");
    if (centre && n_means > 1)
        for (int i = 0; i < n; i++)
            MRT_CHECK(det_cls[i] >= 0 && det_cls[i] < n_means,
                      "vector centring has %d class means; vector %d has class %lld", n_means, i,
                      (long long)det_cls[i]);
    if (n == 0) return MRT_OK;
    const int cond = mode == MRT_MATCH_CONDITIONAL;
    if (!proj || m == 0) proj = NULL, d_out = d; /* nothing to match: the reference skips the projection */
    float *vn = malloc(sizeof(float) * (size_t)n * d);
    float *yv = proj ? malloc(sizeof(float) * (size_t)n * d_out) : NULL;
    const float *vs = vn; /* the vectors matched (n, d) */
    const float **dp = malloc(sizeof(float *) * (size_t)n);
    const float **pp = malloc(sizeof(float *) * (size_t)(m ? m : 1));
    int *pidx = malloc(sizeof(int) * (size_t)(m ? m : 1));
    best_t *bv = malloc(sizeof(best_t) * (size_t)n * MAX_THREADS);
    best_t **bp = malloc(sizeof(best_t *) * (size_t)n * MAX_THREADS);
    pkey_t *dk = malloc(sizeof(pkey_t) * (size_t)n), *pk = malloc(sizeof(pkey_t) * (size_t)(m ? m : 1));
    if (!vn || (proj && !yv) || !dp || !pp || !pidx || !bv || !bp || !dk || !pk) {
        free(vn), free(yv), free(dp), free(pp), free(pidx), free(bv), free(bp), free(dk), free(pk);
        return MRT_FAIL(MRT_ENOMEM, "out of memory (matching %d x %d)", n, m);
    }
    /* the matching space: rows split over threads only for a projection (the rest is a few us) */
    int npt = 1;
    if (proj) {
        npt = threads > 0 ? threads : mrt_threads(1);
        if (npt > MAX_THREADS) npt = MAX_THREADS;
        if ((long)n * d * d_out < THREAD_WORK && threads <= 0) npt = 1;
        if (npt > n) npt = n;
    }
    prep_t preps[MAX_THREADS];
    for (int t = 0; t < npt; t++)
        preps[t] = (prep_t){vectors, d, det_cls, centre ? means : NULL, n_means, proj, d_out, vn, yv,
                            (int)((long)n * t / npt), (int)((long)n * (t + 1) / npt)};
    mrt_parallel(prep_run, preps, sizeof(prep_t), npt);
    if (proj) vs = yv, d = d_out; /* match in the projected space */
    for (size_t i = 0; i < (size_t)n * MAX_THREADS; i++) bv[i] = (best_t){-INFINITY, -1, 0};

    if (cond) {
        for (int i = 0; i < n; i++) dk[i] = (pkey_t){det_cls[i], i};
        for (int j = 0; j < m; j++) pk[j] = (pkey_t){proto_cls[j], j};
        qsort(dk, (size_t)n, sizeof(pkey_t), key_cmp);
        qsort(pk, (size_t)m, sizeof(pkey_t), key_cmp);
        for (int j = 0; j < m; j++) pp[j] = prototypes + (size_t)pk[j].idx * d, pidx[j] = pk[j].idx;
        for (int i = 0; i < n; i++) dp[i] = vs + (size_t)dk[i].idx * d, bp[i] = bv + dk[i].idx;
        int i0 = 0, j0 = 0;
        while (i0 < n && j0 < m) { /* walk both class-sorted lists */
            const int64_t c = dk[i0].cls;
            int i1 = i0;
            while (i1 < n && dk[i1].cls == c) i1++;
            while (j0 < m && pk[j0].cls < c) j0++;
            int j1 = j0;
            while (j1 < m && pk[j1].cls == c) j1++;
            if (j1 > j0) block_match(dp + i0, i1 - i0, pp + j0, pidx + j0, j1 - j0, d, (best_t *const *)bp + i0);
            i0 = i1, j0 = j1;
        }
    } else if (m > 0) {
        for (int j = 0; j < m; j++) pp[j] = prototypes + (size_t)j * d, pidx[j] = j;
        for (int i = 0; i < n; i++) dp[i] = vs + (size_t)i * d;
        /* automatic: one thread unless mrt_set_threads asks for more; on an idle 2-core x86 two threads took
         * 100x1000x448 from 1.5 to 0.9 ms, on the same machine under load they were slower than one */
        int nt = threads > 0 ? threads : mrt_threads(1);
        if (nt > MAX_THREADS) nt = MAX_THREADS;
        if ((long)n * m * d < THREAD_WORK && threads <= 0) nt = 1;
        if (nt > m) nt = m;
        job_t jobs[MAX_THREADS];
        for (int t = 0; t < nt; t++) {
            const int lo = (int)((long)m * t / nt), hi = (int)((long)m * (t + 1) / nt);
            for (int i = 0; i < n; i++) bp[(size_t)t * n + i] = bv + (size_t)t * n + i;
            jobs[t] = (job_t){dp, n, pp + lo, pidx + lo, hi - lo, d, (best_t *const *)bp + (size_t)t * n};
        }
        mrt_parallel(job_run, jobs, sizeof(job_t), nt);
        for (int t = 1; t < nt; t++) /* merge in prototype order: earlier ranges win ties */
            for (int i = 0; i < n; i++) {
                best_t *a = bv + i, *b = bv + (size_t)t * n + i;
                a->nan |= b->nan;
                if (b->idx >= 0 && (a->idx < 0 || b->best > a->best)) a->best = b->best, a->idx = b->idx;
            }
    }
    for (int i = 0; i < n; i++) {
        const best_t *b = bv + i;
        if (b->nan)
            idx[i] = -1, sim[i] = NAN;
        else
            idx[i] = isfinite(b->best) ? b->idx : -1, sim[i] = b->best;
        if (identity) {
            const float thr = idx[i] >= 0 && thresholds ? thresholds[idx[i]] : threshold;
            identity[i] = idx[i] >= 0 && sim[i] >= thr ? idx[i] : -1;
            if (identity[i] >= 0 && negatives) { /* its identity's corrections: one nearer than it refuses it */
                const int j = (int)identity[i];
                const float *u = vs + (size_t)i * d;
                const float own = dot_row(u, prototypes + (size_t)j * d, d);
                for (int k = neg_offsets[j]; k < neg_offsets[j + 1]; k++)
                    if (dot_row(u, negatives + (size_t)k * d, d) > own) {
                        identity[i] = -1;
                        break;
                    }
            }
        }
    }
    free(vn), free(yv), free(dp), free(pp), free(pidx), free(bv), free(bp), free(dk), free(pk);
    return MRT_OK;
}
