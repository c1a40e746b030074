/* Integer token merging (int.token_merge of graphopt/ir/ops/integer_tokens.py) for the cpu_integer backend.
 *
 * One ToMe step per image, threaded over the batch (go_pool.h), computing exactly the reference's integers:
 *   scores  keys >> shift (keys given per head are summed first, as the graph's int32 sum over heads would);
 *           A = even, B = odd offsets after the protected prefix;
 *           score = sign(a.b) tdiv((a.b)^2 2^20, max(|a|^2, 1) max(|b|^2, 1))   (int64, wrapping like torch)
 *   match   each A token's best B (the first on ties); the r A tokens with the highest scores merge
 *           (ties: the lower A first, a stable descending sort); the other tokens keep their order
 *   merge   round((sum x s) / (sum s)) half away from zero over each kept token and the A tokens merged
 *           into it; sizes add. A token nothing merges into is copied (round(x s / s) = x for s >= 1).
 * Divisions by a norm or a merged size use a multiply-shift (exact for numerators below 2^62, which the pass's
 * key shift guarantees); anything larger takes the plain (wrapping, truncating) int64 division.
 * Returns 0, or 1 when a size is below 1 (the reference's division would be undefined there).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "go_pool.h"

#define SCORE_BITS 20

typedef struct { int64_t score; int64_t a; } edge_t;

/* Stable descending order by score: ties keep the lower A index first. */
static int by_score(const void *p, const void *q) {
    const edge_t *x = p, *y = q;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->a < y->a ? -1 : (x->a > y->a);
}

static inline __mmask16 tail16(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }
static inline __mmask8 tail8(int64_t left) { return left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1); }

/* floor(n / d) = (n m) >> (62 + l) for 0 <= n < 2^62, m = ceil(2^(62 + l) / d) <= 2^63, l = ceil(log2 d)
 * (Granlund-Montgomery: m d - 2^(62 + l) < d <= 2^l). */
typedef struct { uint64_t m; int shift; } div62_t;
#define BELOW62(n) ((uint64_t)(n) < ((uint64_t)1 << 62))

static inline div62_t make_div62(uint64_t d) {
    int l = 0;
    while (l < 63 && ((uint64_t)1 << l) < d) l++;
    div62_t v = {(uint64_t)((((unsigned __int128)1 << (62 + l)) + d - 1) / d), 62 + l};
    return v;
}

static inline int64_t div62(int64_t n, div62_t d) { return (int64_t)(((unsigned __int128)n * d.m) >> d.shift); }

static inline int64_t wrap_mul(int64_t a, int64_t b) { return (int64_t)((uint64_t)a * (uint64_t)b); }

/* The reference's score of one pair: sign(dot) tdiv(dot^2 2^20, |a|^2 |b|^2), by two multiply-shift divisions
 * (floor(floor(x / p) / q) = floor(x / (p q))) when nothing wraps, else its wrapping int64 arithmetic. */
static inline int64_t exact_score(int64_t dot, int64_t na2, int64_t nb2, div62_t ia, div62_t ib) {
    int64_t mag;
    if (dot > -(1 << 21) && dot < (1 << 21) && na2 < INT32_MAX && nb2 < INT32_MAX)   /* n < 2^62, no wrap */
        mag = div62(div62((dot * dot) << SCORE_BITS, ia), ib);
    else
        mag = wrap_mul(wrap_mul(dot, dot), (int64_t)1 << SCORE_BITS) / wrap_mul(na2, nb2);
    return dot < 0 ? (int64_t)(0 - (uint64_t)mag) : mag;
}

/* row_estimates' dots by VPDPWSSD on keys below 2^15 (two int16 keys per int32: a2 [dp], bt2 [dp, nbp]), four
 * 16-lane vectors of B at a time, then two, then one (independent sums in flight): one instruction per 32
 * products instead of a multiply and an add per 16. */
__attribute__((target("avx512f,avx512vnni")))
static void dots_vnni(const int32_t *a2, const int32_t *bt2, int64_t dp, int64_t nbp, int32_t *dots) {
    int64_t j = 0;
    for (; j + 64 <= nbp; j += 64) {
        __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t c = 0; c < dp; c++) {
            const int32_t *b = bt2 + c * nbp + j;
            __m512i a = _mm512_set1_epi32(a2[c]);
            s0 = _mm512_dpwssd_epi32(s0, a, _mm512_loadu_si512(b));
            s1 = _mm512_dpwssd_epi32(s1, a, _mm512_loadu_si512(b + 16));
            s2 = _mm512_dpwssd_epi32(s2, a, _mm512_loadu_si512(b + 32));
            s3 = _mm512_dpwssd_epi32(s3, a, _mm512_loadu_si512(b + 48));
        }
        _mm512_storeu_si512(dots + j, s0);
        _mm512_storeu_si512(dots + j + 16, s1);
        _mm512_storeu_si512(dots + j + 32, s2);
        _mm512_storeu_si512(dots + j + 48, s3);
    }
    for (; j + 32 <= nbp; j += 32) {
        __m512i s0 = _mm512_setzero_si512(), s1 = s0;
        for (int64_t c = 0; c < dp; c++) {
            __m512i a = _mm512_set1_epi32(a2[c]);
            s0 = _mm512_dpwssd_epi32(s0, a, _mm512_loadu_si512(bt2 + c * nbp + j));
            s1 = _mm512_dpwssd_epi32(s1, a, _mm512_loadu_si512(bt2 + c * nbp + j + 16));
        }
        _mm512_storeu_si512(dots + j, s0);
        _mm512_storeu_si512(dots + j + 16, s1);
    }
    if (j < nbp) {
        __m512i s0 = _mm512_setzero_si512();
        for (int64_t c = 0; c < dp; c++)
            s0 = _mm512_dpwssd_epi32(s0, _mm512_set1_epi32(a2[c]), _mm512_loadu_si512(bt2 + c * nbp + j));
        _mm512_storeu_si512(dots + j, s0);
    }
}

static inline int32_t pair16(const int32_t *k, int64_t c, int64_t d) {     /* k[c], k[c + 1] (0 past d) as int16s */
    return (int32_t)((uint32_t)(uint16_t)k[c] | (uint32_t)(c + 1 < d ? (uint16_t)k[c + 1] : 0) << 16);
}

/* Dots of A token a with every B token on 16 lanes (bt: the B keys transposed, [d, nbp], zero past nb), in int32
 * (exact when d max|k|^2 < 2^31), and float estimates of their scores, dot |dot| 2^20 / (|a|^2 |b|^2) (ra, rb the
 * reciprocals): off by < 0.5, as the scores are at most 2^20; *high: the highest estimate of the nb B tokens.
 * Returns 0 when a dot reaches 2^21 (the exact score may wrap there, so the estimate says nothing). */
__attribute__((target("avx512f")))
static int row_estimates(const int32_t *a, const int32_t *bt, int64_t d, int64_t nb, int64_t nbp, float ra,
                         const float *rb, int32_t *dots, float *estimate, const int32_t *a2, const int32_t *bt2,
                         float *high) {
    const __m512i wide = _mm512_set1_epi32(1 << 21);
    __m512 top = _mm512_set1_ps(-INFINITY);
    __mmask16 wraps = 0;
    if (bt2) dots_vnni(a2, bt2, (d + 1) / 2, nbp, dots);
    for (int64_t j = 0; j < nbp; j += 16) {
        __m512i acc = _mm512_setzero_si512();
        if (bt2) acc = _mm512_loadu_si512(dots + j);
        else for (int64_t c = 0; c < d; c++)
            acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(a[c]), _mm512_loadu_si512(bt + c * nbp + j)));
        __m512i mag = _mm512_abs_epi32(acc);
        wraps |= _mm512_cmpge_epi32_mask(mag, wide);
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_cvtepi32_ps(mag)), _mm512_set1_ps(ra));
        _mm512_storeu_si512(dots + j, acc);
        v = _mm512_mul_ps(v, _mm512_loadu_ps(rb + j));
        _mm512_storeu_ps(estimate + j, v);
        top = _mm512_mask_max_ps(top, tail16(nb - j), top, v);
    }
    *high = _mm512_reduce_max_ps(top);
    return wraps == 0;
}

/* The B tokens whose estimate is not below high - 4, in order: bit t of mask[j / 16] is token j = 16 (j / 16) + t. */
__attribute__((target("avx512f")))
static void candidates(const float *estimate, int64_t nb, float high, uint16_t *mask) {
    __m512 floor = _mm512_set1_ps(high - 4.0f);
    for (int64_t j = 0; j < nb; j += 16)
        mask[j / 16] = _mm512_cmp_ps_mask(_mm512_loadu_ps(estimate + j), floor, _CMP_NLT_UQ) & tail16(nb - j);
}

/* best[i] = index into B of A token i's most similar B token (the first on ties), score[i] its score. k: shifted
 * keys [n, d]. With AVX-512 and small keys (d max|k|^2 < 2^31), a row's scores are estimated first (row_estimates)
 * and only B tokens within 4 of the highest estimate are scored exactly: the others' exact scores are lower than
 * the maximum (each exact score is within 1 of its real value, each estimate within 0.5). Else every pair is
 * scored exactly. */
static void match_scores(const int32_t *k, int64_t n, int64_t d, int64_t p, int64_t na, int64_t nb, int64_t *norm,
                         div62_t *inv, int64_t *score, int64_t *best) {
    int64_t most = 0, nbp = (nb + 15) / 16 * 16;
    for (int64_t t = p; t < n; t++) {
        const int32_t *row = k + t * d;
        int64_t s = 0;
        for (int64_t c = 0; c < d; c++) {
            s += (int64_t)row[c] * row[c];
            int64_t m = row[c] < 0 ? -(int64_t)row[c] : row[c];
            most = m > most ? m : most;
        }
        norm[t] = s < 1 ? 1 : s;
        inv[t] = make_div62((uint64_t)norm[t]);
    }
    int vec = __builtin_cpu_supports("avx512f") && nb > 0 && most < (1 << 16) && d * most * most < INT32_MAX;
    int pairs = vec && most < (1 << 15) && __builtin_cpu_supports("avx512vnni");   /* int16 keys: dots_vnni */
    int64_t dp = (d + 1) / 2;
    int32_t *bt = NULL, *dots = NULL, *bt2 = NULL, *a2 = NULL;
    uint16_t *mask = NULL;
    float *rb = NULL, *estimate = NULL;
    if (vec) {                                  /* norms below 2^31 too, so nothing else wraps */
        if (pairs) {
            bt2 = calloc((size_t)(dp * nbp), sizeof(int32_t));
            a2 = malloc(sizeof(int32_t) * (size_t)dp);
        } else {
            bt = calloc((size_t)(d * nbp), sizeof(int32_t));
        }
        dots = malloc(sizeof(int32_t) * (size_t)nbp);
        mask = malloc(sizeof(uint16_t) * (size_t)(nbp / 16));
        rb = calloc((size_t)nbp, sizeof(float));
        estimate = malloc(sizeof(float) * (size_t)nbp);
        for (int64_t j = 0; j < nb; j++) {
            const int32_t *b = k + (p + 1 + 2 * j) * d;
            if (pairs) for (int64_t c = 0; c < dp; c++) bt2[c * nbp + j] = pair16(b, 2 * c, d);
            else for (int64_t c = 0; c < d; c++) bt[c * nbp + j] = b[c];
            rb[j] = 1.0f / (float)norm[p + 1 + 2 * j];
        }
    }
    for (int64_t i = 0; i < na; i++) {
        const int32_t *a = k + (p + 2 * i) * d;
        int64_t na2 = norm[p + 2 * i], top = 0, arg = -1;
        if (pairs) for (int64_t c = 0; c < dp; c++) a2[c] = pair16(a, 2 * c, d);
        float high;
        if (vec && row_estimates(a, bt, d, nb, nbp, (float)(1 << SCORE_BITS) / (float)na2, rb, dots, estimate, a2, bt2,
                                 &high)) {
            candidates(estimate, nb, high, mask);
            for (int64_t b = 0; b < nbp / 16; b++)
                for (uint32_t m = mask[b]; m; m &= m - 1) {
                    int64_t j = 16 * b + __builtin_ctz(m);
                    int64_t v = exact_score(dots[j], na2, norm[p + 1 + 2 * j], inv[p + 2 * i], inv[p + 1 + 2 * j]);
                    if (arg < 0 || v > top) { top = v; arg = j; }
                }
        } else {
            for (int64_t j = 0; j < nb; j++) {
                const int32_t *b = k + (p + 1 + 2 * j) * d;
                int64_t dot = 0;
                for (int64_t c = 0; c < d; c++) dot += (int64_t)a[c] * b[c];
                int64_t v = exact_score(dot, na2, norm[p + 1 + 2 * j], inv[p + 2 * i], inv[p + 1 + 2 * j]);
                if (arg < 0 || v > top) { top = v; arg = j; }
            }
        }
        score[i] = top;
        best[i] = arg < 0 ? 0 : arg;
    }
    free(bt); free(bt2); free(a2); free(dots); free(mask); free(rb); free(estimate);
}

/* acc[c] (+)= x[c] s on 8 lanes: int32 times int32 into int64 by VPMULDQ, exact, wrapping like the scalar sum. */
__attribute__((target("avx512f,avx512vl")))
static void scaled_add(int64_t *acc, const int32_t *x, int64_t s, int64_t C, int first) {
    __m512i vs = _mm512_set1_epi64(s);
    for (int64_t c = 0; c < C; c += 8) {
        __mmask8 k = tail8(C - c);
        __m512i p = _mm512_mul_epi32(_mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, x + c)), vs);
        if (!first) p = _mm512_add_epi64(p, _mm512_maskz_loadu_epi64(k, acc + c));
        _mm512_mask_storeu_epi64(acc + c, k, p);
    }
}

/* out[c] = round(acc[c] / s) half away from zero on 8 lanes: floor((2|v| + s) / 2s) by a float64 division. Exact
 * while num = 2|v| + s < 2^53: num and 2s are then exact, a quotient that is not an integer lies 1/2s or more below
 * the next one, and the division's rounding moves it by less than num 2^-53 / 2s. Here |v| < 2^50 and s < 2^40;
 * a vector with a lane beyond that takes the scalar code. */
__attribute__((target("avx512f,avx512dq,avx512vl")))
static void round_divide(const int64_t *acc, int64_t s, div62_t twice, int64_t C, int32_t *out) {
    __m512d two_s = _mm512_set1_pd((double)(2 * s));
    __m512i vs = _mm512_set1_epi64(s), big = _mm512_set1_epi64((int64_t)1 << 50);
    for (int64_t c = 0; c < C; c += 8) {
        __mmask8 k = tail8(C - c);
        __m512i v = _mm512_maskz_loadu_epi64(k, acc + c), a = _mm512_abs_epi64(v);
        if (s >= ((int64_t)1 << 40) || _mm512_mask_cmpge_epu64_mask(k, a, big)) {
            for (int64_t i = c; i < c + 8 && i < C; i++) {
                int64_t w = acc[i], num = 2 * (w < 0 ? -w : w) + s;
                int64_t mag = BELOW62(num) ? div62(num, twice) : num / (2 * s);
                out[i] = (int32_t)(w < 0 ? -mag : mag);
            }
            continue;
        }
        __m512d num = _mm512_cvtepi64_pd(_mm512_add_epi64(_mm512_add_epi64(a, a), vs));
        __m512i q = _mm512_cvttpd_epi64(_mm512_div_pd(num, two_s));
        q = _mm512_mask_sub_epi64(q, _mm512_movepi64_mask(v), _mm512_setzero_si512(), q);
        _mm256_mask_storeu_epi32(out + c, k, _mm512_cvtepi64_epi32(q));
    }
}

enum { KEY_U8 = 0, KEY_I8 = 1, KEY_I32 = 2 };

/* k[t, c] = (int32 sum over h of keys[t kn + h kh + c kc]) >> shift, wrapping like the graph's int32 sum; one
 * loop per key type, contiguous along c in the common case, so the compiler vectorises it. */
#define SUM_HEADS(T)                                                                                            \
    for (int64_t h = 0; h < H; h++) {                                                                          \
        const T *src = (const T *)keys + t * kn + h * kh;                                                       \
        if (kc == 1) for (int64_t c = 0; c < d; c++) row[c] += (uint32_t)src[c];                                \
        else for (int64_t c = 0; c < d; c++) row[c] += (uint32_t)src[c * kc];                                   \
    }

/* sum_heads of contiguous int32 keys on 16 lanes: each head's row added in a register, one store a vector (the
 * row-at-a-time sum loads and stores the row once a head). */
__attribute__((target("avx512f")))
static void sum_heads_i32(const int32_t *keys, int64_t H, int64_t kn, int64_t kh, int64_t n, int64_t d, int shift,
                          int32_t *k) {
    __m128i sh = _mm_cvtsi32_si128(shift);
    for (int64_t t = 0; t < n; t++)
        for (int64_t c = 0; c < d; c += 16) {
            __mmask16 m = tail16(d - c);
            const int32_t *src = keys + t * kn + c;
            __m512i sum = _mm512_setzero_si512();
            for (int64_t h = 0; h < H; h++) sum = _mm512_add_epi32(sum, _mm512_maskz_loadu_epi32(m, src + h * kh));
            _mm512_mask_storeu_epi32(k + t * d + c, m, _mm512_sra_epi32(sum, sh));
        }
}

static void sum_heads(const void *keys, int type, int64_t H, int64_t kn, int64_t kh, int64_t kc, int64_t n, int64_t d,
                      int shift, int32_t *k) {
    if (type == KEY_I32 && kc == 1 && __builtin_cpu_supports("avx512f")) {
        sum_heads_i32(keys, H, kn, kh, n, d, shift, k);
        return;
    }
    for (int64_t t = 0; t < n; t++) {
        uint32_t *row = (uint32_t *)(k + t * d);
        memset(row, 0, sizeof(uint32_t) * (size_t)d);
        if (type == KEY_I32) { SUM_HEADS(int32_t) }
        else if (type == KEY_I8) { SUM_HEADS(int8_t) }
        else { SUM_HEADS(uint8_t) }
        for (int64_t c = 0; c < d; c++) k[t * d + c] = (int32_t)row[c] >> shift;
    }
}

/* One image: x [n, C], keys [n, H, d] (u8 / i8 / i32 at element strides kn, kh, kc; summed over H in int32 with
 * wrap-around, then shifted, here), sizes [n]; out [n - r, C], out_sizes [n - r]. */
static int merge_one(const int32_t *x, const void *keys, int key_type, int64_t H, int64_t kn, int64_t kh, int64_t kc,
                     const int32_t *sizes, int64_t n, int64_t C, int64_t d, int64_t r, int64_t p, int shift,
                     int32_t *out, int32_t *out_sizes) {
    int64_t na = (n - p + 1) / 2, nb = (n - p) / 2;
    int32_t *k = malloc(sizeof(int32_t) * (size_t)(n * d));
    div62_t *inv = malloc(sizeof(div62_t) * (size_t)n);
    int64_t *norm = malloc(sizeof(int64_t) * (size_t)n), *score = malloc(sizeof(int64_t) * (size_t)(na + 1));
    int64_t *best = malloc(sizeof(int64_t) * (size_t)(na + 1)), *first = malloc(sizeof(int64_t) * (size_t)n);
    int64_t *next = malloc(sizeof(int64_t) * (size_t)n), *acc = malloc(sizeof(int64_t) * (size_t)C);
    edge_t *edges = malloc(sizeof(edge_t) * (size_t)(na + 1));
    unsigned char *gone = calloc((size_t)n, 1);
    int status = 0, vec = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
    sum_heads(keys, key_type, H, kn, kh, kc, n, d, shift, k);
    match_scores(k, n, d, p, na, nb, norm, inv, score, best);
    for (int64_t i = 0; i < na; i++) { edges[i].score = score[i]; edges[i].a = i; }
    qsort(edges, (size_t)na, sizeof(edge_t), by_score);
    for (int64_t t = 0; t < n; t++) first[t] = -1;
    for (int64_t j = 0; j < r; j++) {             /* src -> dst lists, each in merge order */
        int64_t src = p + 2 * edges[j].a, dst = p + 1 + 2 * best[edges[j].a];
        gone[src] = 1;
        next[src] = first[dst];
        first[dst] = src;
    }
    int64_t o = 0;
    for (int64_t t = 0; t < n; t++) {
        if (gone[t]) continue;
        const int32_t *xt = x + t * C;
        int32_t *ot = out + o * C;
        if (sizes[t] < 1) status = 1;
        if (first[t] < 0) {                        /* nothing merges into t: round(x s / s) = x */
            memcpy(ot, xt, sizeof(int32_t) * (size_t)C);
            out_sizes[o++] = sizes[t];
            continue;
        }
        int64_t s = sizes[t];
        if (vec) scaled_add(acc, xt, s, C, 1);
        else for (int64_t c = 0; c < C; c++) acc[c] = (int64_t)xt[c] * s;
        for (int64_t u = first[t]; u >= 0; u = next[u]) {
            const int32_t *xu = x + u * C;
            int64_t su = sizes[u];
            if (su < 1) status = 1;
            s += su;
            if (vec) scaled_add(acc, xu, su, C, 0);
            else for (int64_t c = 0; c < C; c++) acc[c] += (int64_t)xu[c] * su;
        }
        if (s < 1) s = 1;                          /* only with sizes < 1, already reported */
        div62_t twice = make_div62((uint64_t)(2 * s));
        if (vec) {
            round_divide(acc, s, twice, C, ot);
        } else {
            for (int64_t c = 0; c < C; c++) {
                int64_t v = acc[c], num = 2 * (v < 0 ? -v : v) + s;
                int64_t mag = BELOW62(num) ? div62(num, twice) : num / (2 * s);
                ot[c] = (int32_t)(v < 0 ? -mag : mag);
            }
        }
        out_sizes[o++] = (int32_t)s;
    }
    free(k); free(inv); free(norm); free(score); free(best); free(first); free(next); free(acc); free(edges); free(gone);
    return status;
}

typedef struct {
    const int32_t *x, *sizes;
    const void *keys;
    int key_type;
    int64_t H, kb, kn, kh, kc, n, C, d, r, p;
    int shift;
    int32_t *out, *out_sizes;
    _Atomic int status;
} merge_job_t;

static void merge_image(const void *arg, int64_t b, void **scratch) {
    merge_job_t *j = (merge_job_t *)arg;
    (void)scratch;
    int64_t n = j->n, C = j->C, d = j->d, r = j->r;
    int64_t bytes = j->key_type == KEY_I32 ? 4 : 1;
    if (merge_one(j->x + b * n * C, (const char *)j->keys + b * j->kb * bytes, j->key_type, j->H, j->kn, j->kh, j->kc,
                  j->sizes + b * n, n, C, d, r, j->p, j->shift, j->out + b * (n - r) * C, j->out_sizes + b * (n - r)))
        atomic_fetch_or(&j->status, 1);
}

/* x [B, n, C], sizes [B, n] (contiguous), keys [B, n, H, d] of key_type (KEY_*) at element strides kb, kn, kh, kc,
 * summed over its H heads (H 1: keys [B, n, d]) -> out [B, n - r, C], out_sizes [B, n - r]; r is the effective r
 * (0 < r <= (n - p) / 2). One image a chunk on the pool of go_pool.h. */
int gt_token_merge(const int32_t *x, const void *keys, int key_type, int64_t H, int64_t kb, int64_t kn, int64_t kh,
                   int64_t kc, const int32_t *sizes, int64_t B, int64_t n, int64_t C, int64_t d, int64_t r, int64_t p,
                   int32_t shift, int32_t *out, int32_t *out_sizes, int threads) {
    merge_job_t j = {x, sizes, keys, key_type, H, kb, kn, kh, kc, n, C, d, r, p, shift, out, out_sizes, 0};
    pool_run(threads, B, merge_image, NULL, &j);
    return atomic_load(&j.status);
}
