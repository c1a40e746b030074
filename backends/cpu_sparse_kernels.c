/* Sparse-weight GEMMs for graphopt's ``sparse_linear`` op (CPU):
 *
 *   gs_spmm_f32   y[M, N] = x[M, K] @ Wᵀ + bias, W [N, K] float32 in CSR (one entry per nonzero) or in
 *                 1x4 blocks along K (one entry per block of 4 consecutive k of one row)
 *   gs_spmm_s8    the int8 1x4-block product of u8 activations and s8 weights with int32 accumulation,
 *                 followed by the integer requant epilogue of ``int.requant`` (or raw int32); AVX512-VNNI
 *                 (vpdpbusd reads one 4-byte block per instruction) when the CPU has it, else portable C
 *
 * Both walk the activations in tiles of MT rows transposed into [K][MT] (so one weight entry scales a
 * contiguous MT-wide vector: the classic SpMM layout), and each output column n accumulates in registers
 * over the nonzeros of W's row n. Threads split the row tiles (and the output columns when there are
 * fewer tiles than threads). The int8 kernel runs among cpu_integer's kernels, so on their go_pool.h pool
 * (OpenMP's spinning workers took the cores from that pool: integer DeiT-S with int8 SpMM fc2 layers 142 ms on the
 * pool, 204 ms on OpenMP); the fp32 one runs among torch's ops, so on OpenMP like them (on the pool, DeiT-S b8 at
 * 90% unstructured went 301 -> 471 ms: the two runtimes' spinning threads competed).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "go_pool.h"

#define MT 64                       /* activation rows per tile */
#define NB 16                       /* output columns buffered before they are written row by row */

enum { OUT_U8 = 0, OUT_I8 = 1, OUT_I32 = 2 };

static int isa_limit = 1;           /* 1: VNNI allowed, 0: portable C only */

int gs_has_vnni(void) { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"); }

void gs_limit_isa(int level) { isa_limit = level; }

static void split(int64_t M, int64_t N, int threads, int64_t *tiles, int64_t *chunks, int64_t *chunk) {
    *tiles = (M + MT - 1) / MT;
    int64_t want = (2 * threads + *tiles - 1) / *tiles;          /* column chunks per tile */
    if (want < 1) want = 1;
    *chunk = (N + want - 1) / want;
    if (*chunk < 1) *chunk = 1;
    *chunks = (N + *chunk - 1) / *chunk;
}

/* ---- float32 ---- */
static void transpose_f32(const float *x, int64_t ldx, int64_t m0, int64_t rows, int64_t K, float *xt) {
    for (int64_t k = 0; k < K; k++) {
        float *dst = xt + k * MT;
        for (int64_t i = 0; i < rows; i++) dst[i] = x[(m0 + i) * ldx + k];
        for (int64_t i = rows; i < MT; i++) dst[i] = 0.0f;
    }
}

/* one output column over a tile: acc[i] = b + sum over W's row of value * xt[k][i] */
__attribute__((target("avx512f")))
static void column_f32_avx512(const float *xt, const int32_t *col, const float *val, int32_t j0, int32_t j1, int block,
                              float b, float *acc) {
    __m512 a0 = _mm512_set1_ps(b), a1 = a0, a2 = a0, a3 = a0;
    if (block) {
        for (int32_t j = j0; j < j1; j++) {
            const float *p = xt + (int64_t)col[j] * 4 * MT;
            for (int t = 0; t < 4; t++, p += MT) {
                const __m512 v = _mm512_set1_ps(val[4 * (int64_t)j + t]);
                a0 = _mm512_fmadd_ps(v, _mm512_load_ps(p), a0);
                a1 = _mm512_fmadd_ps(v, _mm512_load_ps(p + 16), a1);
                a2 = _mm512_fmadd_ps(v, _mm512_load_ps(p + 32), a2);
                a3 = _mm512_fmadd_ps(v, _mm512_load_ps(p + 48), a3);
            }
        }
    } else {
        for (int32_t j = j0; j < j1; j++) {
            const float *p = xt + (int64_t)col[j] * MT;
            const __m512 v = _mm512_set1_ps(val[j]);
            a0 = _mm512_fmadd_ps(v, _mm512_load_ps(p), a0);
            a1 = _mm512_fmadd_ps(v, _mm512_load_ps(p + 16), a1);
            a2 = _mm512_fmadd_ps(v, _mm512_load_ps(p + 32), a2);
            a3 = _mm512_fmadd_ps(v, _mm512_load_ps(p + 48), a3);
        }
    }
    _mm512_store_ps(acc, a0);
    _mm512_store_ps(acc + 16, a1);
    _mm512_store_ps(acc + 32, a2);
    _mm512_store_ps(acc + 48, a3);
}

static void column_f32_portable(const float *xt, const int32_t *col, const float *val, int32_t j0, int32_t j1,
                                int block, float b, float *acc) {
    for (int i = 0; i < MT; i++) acc[i] = b;
    for (int32_t j = j0; j < j1; j++) {
        int width = block ? 4 : 1;
        const float *p = xt + (int64_t)col[j] * width * MT;
        for (int t = 0; t < width; t++, p += MT)
            for (int i = 0; i < MT; i++) acc[i] += val[(int64_t)j * width + t] * p[i];
    }
}

/* block: 0 CSR (col = k of each value), 1 1x4 blocks (col = k / 4 of each block, 4 values per block) */
void gs_spmm_f32(const float *x, int64_t ldx, int64_t M, int64_t K, const int32_t *row_ptr, const int32_t *col,
                 const float *val, int block, int64_t N, const float *bias, float *y, int64_t ldy, int threads) {
    int64_t tiles, chunks, chunk;
    split(M, N, threads, &tiles, &chunks, &chunk);
    int avx512 = isa_limit >= 1 && __builtin_cpu_supports("avx512f");
#pragma omp parallel num_threads(threads)
    {
        float *xt = aligned_alloc(64, sizeof(float) * (size_t)((K + 3) / 4 * 4) * MT);
        memset(xt, 0, sizeof(float) * (size_t)((K + 3) / 4 * 4) * MT);
        float ot[NB][MT] __attribute__((aligned(64)));
        int64_t have = -1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tiles * chunks; task++) {
            int64_t t = task / chunks, n0 = (task % chunks) * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
            int64_t m0 = t * MT, rows = M - m0 < MT ? M - m0 : MT;
            if (have != t) { transpose_f32(x, ldx, m0, rows, K, xt); have = t; }
            for (int64_t nb = n0; nb < n1; nb += NB) {         /* NB columns, then NB contiguous floats per row */
                int cnt = n1 - nb < NB ? (int)(n1 - nb) : NB;
                for (int c = 0; c < cnt; c++) {
                    int64_t n = nb + c;
                    float b = bias ? bias[n] : 0.0f;
                    if (avx512) column_f32_avx512(xt, col, val, row_ptr[n], row_ptr[n + 1], block, b, ot[c]);
                    else column_f32_portable(xt, col, val, row_ptr[n], row_ptr[n + 1], block, b, ot[c]);
                }
                for (int64_t i = 0; i < rows; i++)
                    for (int c = 0; c < cnt; c++) y[(m0 + i) * ldy + nb + c] = ot[c][i];
            }
        }
        free(xt);
    }
}

/* ---- int8 1x4 blocks with the requant epilogue ---- */
typedef struct {
    int32_t raw, out_type;          /* raw: int32 accumulators (+ bias) out, no requant */
    const int32_t *bias;            /* per column, already minus x_zp * rowsum(W) */
    const int32_t *m, *c;           /* per column (or one value when per_column == 0) */
    int32_t per_column, pre, k, lo, hi, zp;
} requant_t;

static inline int32_t tdiv_pow2(int32_t x, int p) {        /* truncate toward zero */
    return p ? (int32_t)((x + ((x >> 31) & ((1 << p) - 1))) >> p) : x;
}

/* int.requant of one value, in 64 bits like the reference: clamp(floor((tdiv(x, 2^pre) m + c) / 2^k), lo, hi) + zp */
static inline int32_t requant1(int32_t x, const requant_t *e, int64_t n) {
    int64_t m = e->m[e->per_column ? n : 0], c = e->c[e->per_column ? n : 0];
    int64_t v = ((int64_t)tdiv_pow2(x, e->pre) * m + c) >> e->k;
    v = v < e->lo ? e->lo : (v > e->hi ? e->hi : v);
    return (int32_t)v + e->zp;
}

/* requant1 on one tile column (MT accumulators of output column n) in place, 16 lanes at a time in 64 bits:
   the scalar epilogue cost as much as the block products when each output sums few blocks (K = 384) */
__attribute__((target("avx512f")))
static void requant_column_avx512(int32_t *acc, const requant_t *e, int64_t n) {
    const int64_t at = e->per_column ? n : 0;
    const __m512i m = _mm512_set1_epi64(e->m[at]), c = _mm512_set1_epi64(e->c[at]);
    const __m512i lo = _mm512_set1_epi64(e->lo), hi = _mm512_set1_epi64(e->hi), zp = _mm512_set1_epi32(e->zp);
    const __m512i round = _mm512_set1_epi32(e->pre ? (1 << e->pre) - 1 : 0);
    const __m128i pre = _mm_cvtsi32_si128(e->pre), k = _mm_cvtsi32_si128(e->k);
    for (int i = 0; i < MT; i += 16) {
        __m512i x = _mm512_load_si512(acc + i);
        x = _mm512_sra_epi32(_mm512_add_epi32(x, _mm512_and_si512(_mm512_srai_epi32(x, 31), round)), pre);
        __m512i v0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(x));
        __m512i v1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(x, 1));
        v0 = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mul_epi32(v0, m), c), k);
        v0 = _mm512_min_epi64(_mm512_max_epi64(v0, lo), hi);
        v1 = _mm512_sra_epi64(_mm512_add_epi64(_mm512_mul_epi32(v1, m), c), k);
        v1 = _mm512_min_epi64(_mm512_max_epi64(v1, lo), hi);
        x = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(v0)), _mm512_cvtepi64_epi32(v1), 1);
        _mm512_store_si512(acc + i, _mm512_add_epi32(x, zp));
    }
}

/* NB buffered columns (their final int32 values) -> rows of y, one output type per loop */
static void store_rows(const int32_t (*acc)[MT], int64_t rows, int cnt, void *y, int64_t at, int64_t ldy, int type) {
    for (int64_t i = 0; i < rows; i++, at += ldy) {
        if (type == OUT_U8) for (int c = 0; c < cnt; c++) ((uint8_t *)y)[at + c] = (uint8_t)acc[c][i];
        else if (type == OUT_I8) for (int c = 0; c < cnt; c++) ((int8_t *)y)[at + c] = (int8_t)acc[c][i];
        else for (int c = 0; c < cnt; c++) ((int32_t *)y)[at + c] = acc[c][i];
    }
}

/* xt[g][i] = the 4 bytes x[m0 + i][4g .. 4g+3] as one uint32 (K padded to a multiple of 4 with zeros) */
static void transpose_u8(const uint8_t *x, int64_t ldx, int64_t m0, int64_t rows, int64_t K, uint32_t *xt) {
    int64_t G = (K + 3) / 4;
    for (int64_t g = 0; g < G; g++) {
        uint32_t *dst = xt + g * MT;
        for (int64_t i = 0; i < rows; i++) {
            const uint8_t *src = x + (m0 + i) * ldx + 4 * g;
            uint32_t w = 0;
            if (4 * g + 4 <= K) memcpy(&w, src, 4);
            else for (int64_t j = 0; 4 * g + j < K; j++) w |= (uint32_t)src[j] << (8 * j);
            dst[i] = w;
        }
        for (int64_t i = rows; i < MT; i++) dst[i] = 0;
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void column_vnni(const uint32_t *xt, const int32_t *col, const int32_t *val, int32_t j0, int32_t j1, int32_t b,
                        int32_t *acc) {
    __m512i a0 = _mm512_set1_epi32(b), a1 = a0, a2 = a0, a3 = a0;
    for (int32_t j = j0; j < j1; j++) {
        const __m512i w = _mm512_set1_epi32(val[j]);
        const uint32_t *p = xt + (int64_t)col[j] * MT;
        a0 = _mm512_dpbusd_epi32(a0, _mm512_load_si512(p), w);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_load_si512(p + 16), w);
        a2 = _mm512_dpbusd_epi32(a2, _mm512_load_si512(p + 32), w);
        a3 = _mm512_dpbusd_epi32(a3, _mm512_load_si512(p + 48), w);
    }
    _mm512_storeu_si512(acc, a0);
    _mm512_storeu_si512(acc + 16, a1);
    _mm512_storeu_si512(acc + 32, a2);
    _mm512_storeu_si512(acc + 48, a3);
}

static void column_portable(const uint32_t *xt, const int32_t *col, const int32_t *val, int32_t j0, int32_t j1,
                            int32_t b, int32_t *acc) {
    for (int i = 0; i < MT; i++) acc[i] = b;
    for (int32_t j = j0; j < j1; j++) {
        const int8_t *w = (const int8_t *)&val[j];
        const uint32_t *p = xt + (int64_t)col[j] * MT;
        for (int i = 0; i < MT; i++) {
            const uint8_t *a = (const uint8_t *)&p[i];
            acc[i] += (int32_t)a[0] * w[0] + (int32_t)a[1] * w[1] + (int32_t)a[2] * w[2] + (int32_t)a[3] * w[3];
        }
    }
}

/* A pool thread's transposed activation tile (the last one it transposed: consecutive tasks often share it). */
typedef struct { void *xt; int64_t have; } tile_scratch_t;

static tile_scratch_t *tile_scratch(void **scratch, size_t bytes) {
    if (!*scratch) {
        tile_scratch_t *t = malloc(sizeof(tile_scratch_t));
        t->xt = aligned_alloc(64, (bytes + 63) / 64 * 64);
        memset(t->xt, 0, (bytes + 63) / 64 * 64);
        t->have = -1;
        *scratch = t;
    }
    return *scratch;
}

static void tile_scratch_free(void *p) {
    tile_scratch_t *t = p;
    free(t->xt);
    free(t);
}

typedef struct {
    const uint8_t *x;
    int64_t ldx, M, K;
    const int32_t *row_ptr, *col, *val;
    int64_t N;
    const requant_t *e;
    void *y;
    int64_t ldy, chunks, chunk;
    int vnni;
} spmm_s8_job_t;

static void spmm_s8_task(const void *arg, int64_t task, void **scratch) {
    const spmm_s8_job_t *j = arg;
    const requant_t *e = j->e;
    int64_t K = j->K, N = j->N;
    tile_scratch_t *w = tile_scratch(scratch, sizeof(uint32_t) * (size_t)((K + 3) / 4) * MT + 64);
    int32_t acc[NB][MT] __attribute__((aligned(64)));
    int64_t t = task / j->chunks, n0 = (task % j->chunks) * j->chunk, n1 = n0 + j->chunk < N ? n0 + j->chunk : N;
    int64_t m0 = t * MT, rows = j->M - m0 < MT ? j->M - m0 : MT;
    if (w->have != t) { transpose_u8(j->x, j->ldx, m0, rows, K, w->xt); w->have = t; }
    for (int64_t nb = n0; nb < n1; nb += NB) {
        int cnt = n1 - nb < NB ? (int)(n1 - nb) : NB;
        for (int c = 0; c < cnt; c++) {
            int64_t n = nb + c;
            int32_t b = e->bias ? e->bias[n] : 0;
            if (j->vnni) column_vnni(w->xt, j->col, j->val, j->row_ptr[n], j->row_ptr[n + 1], b, acc[c]);
            else column_portable(w->xt, j->col, j->val, j->row_ptr[n], j->row_ptr[n + 1], b, acc[c]);
            if (e->raw) continue;
            if (j->vnni) requant_column_avx512(acc[c], e, n);
            else for (int64_t i = 0; i < rows; i++) acc[c][i] = requant1(acc[c][i], e, n);
        }
        store_rows((const int32_t (*)[MT])acc, rows, cnt, j->y, m0 * j->ldy + nb, j->ldy, e->out_type);
    }
}

/* x u8 [M, K]; W in 1x4 blocks: row_ptr [N + 1], col (= k / 4) and val (4 int8 packed in an int32) per block */
void gs_spmm_s8(const uint8_t *x, int64_t ldx, int64_t M, int64_t K, const int32_t *row_ptr, const int32_t *col,
                const int32_t *val, int64_t N, const requant_t *e, void *y, int64_t ldy, int threads) {
    int64_t tiles, chunks, chunk;
    split(M, N, threads, &tiles, &chunks, &chunk);
    spmm_s8_job_t j = {x, ldx, M, K, row_ptr, col, val, N, e, y, ldy, chunks, chunk, isa_limit >= 1 && gs_has_vnni()};
    pool_run(threads, tiles * chunks, spmm_s8_task, tile_scratch_free, &j);
}
