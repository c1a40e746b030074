/* Integer-only CPU kernels for graphopt's ``cpu_integer`` backend.
 *
 * Each kernel computes exactly the integers of the reference ops in graphopt/ir/ops/integer.py
 * (int32 arithmetic with the pass's no-overflow guarantees; no floating point anywhere):
 *   go_gemm       u8 x s8 GEMM, int32 accumulation, with a fused epilogue: raw int32, dyadic requant,
 *                 requant + ShiftGELU table (+ a second requant), or the residual add (int.add)
 *   go_bmm        batched GEMM of two activations (attention), optionally straight into Shiftmax (with the
 *                 proportional-attention term of token merging added to the logits)
 *   go_shiftmax   (masked) Shiftmax over rows, optionally with the proportional-attention term
 *   go_layernorm  integer LayerNorm over rows, optionally followed by a per-channel requant
 *   go_requant    a per-column requant of 8- or 32-bit data
 *   go_add        the residual add (int.add) of two int32 tensors with per-column constants (b's rows may
 *                 repeat: a broadcast is read in place)
 * With `live` (NULL: every row) the GEMM, bmm and row kernels compute only the rows it marks, and write zeros in
 * the others: rows of padding nobody reads (backends/cpu_integer_rows.py proves which).
 * Divisions by a per-row invariant use Granlund-Montgomery multiply-shift (exact for n < 2^31).
 * The GEMM uses AMX (tdpbusd) or AVX512-VNNI (vpdpbusd) when the CPU has them, else portable C; all three
 * read the same packed B. Every kernel runs in chunks (row blocks, batch items, rows) on the barrier-free
 * helper-thread pool of go_pool.h, not OpenMP (whose spinning workers compete with it on shared cores).
 */
#include <stdint.h>
#include <string.h>
#include <cpuid.h>
#include <immintrin.h>
#include <stdlib.h>
#include "go_pool.h"

#define NR 32                       /* columns per packed B panel */
#define MR 8                        /* rows per VNNI / portable micro-tile (8 x 2 zmm accumulators) */

enum { OUT_U8 = 0, OUT_I8 = 1, OUT_I32 = 2 };
enum { EPI_RAW = 0, EPI_REQUANT = 1, EPI_TABLE = 2, EPI_ADD = 3, EPI_TABLE_REQUANT = 4,
       EPI_ADD_REQUANT = 5,         /* only as softmax_t.logits: EPI_ADD of the size term, then the m2, c2 requant */
       EPI_REQUANT2 = 6 };          /* bmm only: requant (+ zp), then the per-column m2, c2 requant */

typedef struct {
    int32_t kind, out_type;
    const int32_t *bias;            /* per column, already minus a_zp * colsum(B) */
    int32_t pre, k, lo, hi, zp;     /* requant: clamp(fdiv(tdiv(x, 2^pre) * m + c, 2^k), lo, hi) + zp */
    const int32_t *m, *c;           /* per column */
    const int32_t *table;           /* EPI_TABLE(_REQUANT): table[y - lo] with y the requant before zp */
    const int32_t *res;             /* EPI_ADD: y = requant(tdiv(acc, 2^pre) m + tdiv(res, 2^pb) mb + c) */
    int64_t ldr;
    int32_t pb, pad_;
    const int32_t *mb;
    const int32_t *m2, *c2;         /* EPI_TABLE_REQUANT: a second per-column requant of the table value;
                                       EPI_REQUANT2 (bmm): of the first requant's value, N columns per item */
    int32_t pre2, k2, lo2, hi2, zp2, pad2_;
    const int32_t *ks;              /* GEMM only: per-column k of the (first) requant, NULL: k for every column */
    int32_t gelu_x, gelu_n, gelu_bits, gelu_in_bits;  /* EPI_TABLE_REQUANT: the table is int.shiftgelu(y + zp)
                                                         with these attributes (gelu_x 0: unknown, use the table) */
} epilogue_t;

#define AMX_M 32                    /* rows per AMX block (two 16-row A tiles) */

static int isa_limit = 2;           /* 2: AMX allowed, 1: at most VNNI, 0: portable C only */

int go_has_vnni(void) { return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"); }

/* AMX needs the CPU feature and the kernel's permission for the tile data state (Linux arch_prctl). */
int go_has_amx(void) {
    static int state = -1;
    if (state < 0) {
        unsigned a, b, c, d;
        __cpuid_count(7, 0, a, b, c, d);
        int cpu = ((d >> 24) & 1) && ((d >> 25) & 1);        /* AMX-TILE, AMX-INT8 */
        state = cpu && go_has_vnni() && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
    }
    return state;
}

void go_limit_isa(int level) { isa_limit = level; }

/* The go_* signatures' version, checked by cpu_integer_library.library(): bumped whenever one changes, so a
 * library built from another source (bench/vnni_peak.py --baseline) is refused rather than called wrongly. */
int go_abi(void) { return 5; }

static inline int32_t tdiv_pow2(int32_t x, int p) {       /* truncate toward zero */
    return p ? (int32_t)((x + ((x >> 31) & ((1 << p) - 1))) >> p) : x;
}

static inline int32_t wrap_madd(int32_t a, int32_t b, int32_t c) {   /* a*b + c with int32 wrap-around */
    return (int32_t)((uint32_t)a * (uint32_t)b + (uint32_t)c);
}

static inline int32_t clamp32(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* int.requant of one value before its zero point: clamp(fdiv(tdiv(x, 2^pre) * m + c, 2^k), lo, hi) */
static inline int32_t requant1(int32_t x, int32_t m, int32_t c, int pre, int k, int32_t lo, int32_t hi) {
    return clamp32(wrap_madd(tdiv_pow2(x, pre), m, c) >> k, lo, hi);
}

/* ---- B packing: [N, K] int8 -> panels of NR columns, groups of 4 consecutive k per column ---- */
int64_t go_packed_size(int64_t N, int64_t K) { return ((N + NR - 1) / NR) * ((K + 3) / 4) * NR * 4; }

/* Packs B given by strides (element (n, k) at b[n * sn + k * sk]) into the layout of a K padded with zeros to
 * Kpad; flip: u8 data with zero point 128 read as s8. */
static void pack_strided(const int8_t *b, int64_t sn, int64_t sk, int64_t N, int64_t K, int64_t Kpad, int flip,
                         int8_t *out, int32_t *colsum) {
    int64_t K4 = (Kpad + 3) / 4;
    int8_t x = flip ? (int8_t)0x80 : 0;
    memset(out, 0, (size_t)go_packed_size(N, Kpad));
    memset(colsum, 0, sizeof(int32_t) * (size_t)N);
    if (sk == 1) {                         /* each column's k run is contiguous: 4 bytes at a time */
        for (int64_t n = 0; n < N; n++) {
            int8_t *dst = out + ((n / NR) * K4 * NR + n % NR) * 4;
            const int8_t *src = b + n * sn;
            int32_t s = 0;
            for (int64_t k = 0; k < K; k++) s += (int8_t)(src[k] ^ x);
            colsum[n] = s;
            for (int64_t g = 0; g < K / 4; g++)
                for (int j = 0; j < 4; j++) dst[g * NR * 4 + j] = (int8_t)(src[4 * g + j] ^ x);
            for (int64_t k = K / 4 * 4; k < K; k++) dst[(k / 4) * NR * 4 + k % 4] = (int8_t)(src[k] ^ x);
        }
        return;
    }
    for (int64_t k = 0; k < K; k++) {      /* row by row of B (unit n stride in the usual case) */
        const int8_t *src = b + k * sk;
        int8_t *dst = out + (k / 4) * NR * 4 + k % 4;
        for (int64_t n = 0; n < N; n++) {
            int8_t v = (int8_t)(src[n * sn] ^ x);
            dst[((n / NR) * K4 * NR + n % NR) * 4] = v;
            colsum[n] += v;
        }
    }
}

void go_pack_b(const int8_t *b, int64_t N, int64_t K, int8_t *out, int32_t *colsum) {
    pack_strided(b, K, 1, N, K, K, 0, out, colsum);
}

/* ---- micro-kernels: tile[r][n] = sum_k A[r][k] * B[n][k] (A as u8, B as s8), r < mr <= MR ---- */
/* Register blocking: ROWS x 2 zmm accumulators (16 of the 32 registers at ROWS = MR), each k4 group of the
 * panel loaded once (two zmm) and every row's 4 A bytes broadcast as one int32. (Software prefetch of the
 * panel and grouping row blocks per panel for L1 measured no gain: the hardware prefetcher keeps up.) MR = 8
 * rather than 12 (24 accumulators), though each panel load now feeds 8 rows instead of 12: the whole DeiT-S
 * forward ran 3.5-5 % faster at batch 8 and 3 % at batch 1 on Zen 4, in-process A/B (bench/vnni_peak.py
 * --end-to-end --baseline); 8 x 197 tokens also leaves no ragged block. */
/* HALVES 1: only the panel's first 16 columns (its last panel has no more live ones: DeiT-S's 197 keys leave 5 in
 * the seventh), half the multiply-adds. */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline void tile_vnni_rows(const uint8_t *a, int64_t lda, const int8_t *bp, int64_t K4, int32_t *tile,
                                  const int ROWS, const int HALVES) {
    __m512i acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int64_t g = 0; g < K4; g++) {
        const int8_t *b = bp + g * NR * 4;
        __m512i b0 = _mm512_loadu_si512(b), b1 = HALVES == 2 ? _mm512_loadu_si512(b + 64) : b0;
#pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            int32_t a4;
            memcpy(&a4, a + r * lda + 4 * g, 4);
            __m512i av = _mm512_set1_epi32(a4);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
            if (HALVES == 2) acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) {
        _mm512_store_si512(tile + r * NR, acc[r][0]);
        if (HALVES == 2) _mm512_store_si512(tile + r * NR + 16, acc[r][1]);
    }
}

/* One instance per row count, so a block's last rows cost only their own work. */
#define TILE_VNNI(R) \
    __attribute__((target("avx512f,avx512bw,avx512vnni"))) \
    static void tile_vnni_##R(const uint8_t *a, int64_t lda, const int8_t *bp, int64_t K4, int32_t *tile) { \
        tile_vnni_rows(a, lda, bp, K4, tile, R, 2); \
    } \
    __attribute__((target("avx512f,avx512bw,avx512vnni"))) \
    static void tile_vnni_half_##R(const uint8_t *a, int64_t lda, const int8_t *bp, int64_t K4, int32_t *tile) { \
        tile_vnni_rows(a, lda, bp, K4, tile, R, 1); \
    }
TILE_VNNI(1) TILE_VNNI(2) TILE_VNNI(3) TILE_VNNI(4) TILE_VNNI(5) TILE_VNNI(6) TILE_VNNI(7) TILE_VNNI(8)

typedef void (*tile_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, int32_t *);
static const tile_fn tile_vnni[2][MR + 1] = {
    {NULL, tile_vnni_half_1, tile_vnni_half_2, tile_vnni_half_3, tile_vnni_half_4, tile_vnni_half_5, tile_vnni_half_6,
     tile_vnni_half_7, tile_vnni_half_8},
    {NULL, tile_vnni_1, tile_vnni_2, tile_vnni_3, tile_vnni_4, tile_vnni_5, tile_vnni_6, tile_vnni_7, tile_vnni_8}};

static void tile_portable(const uint8_t *a, int64_t lda, int mr, const int8_t *bp, int64_t K4, int32_t *tile) {
    for (int r = 0; r < mr; r++)
        for (int n = 0; n < NR; n++) {
            int32_t s = 0;
            for (int64_t g = 0; g < K4; g++)
                for (int j = 0; j < 4; j++) s += (int32_t)a[r * lda + 4 * g + j] * (int32_t)bp[(g * NR + n) * 4 + j];
            tile[r * NR + n] = s;
        }
}

/* ---- exact division by a row-invariant d (1 <= d < 2^31) of numerators 0 <= n < 2^31 ---- */
typedef struct { uint32_t m; int shift; } divisor_t;   /* m = ceil(2^(31+l) / d) < 2^32, l = ceil(log2 d) */

static inline divisor_t make_divisor(uint32_t d) {
    int l = d > 1 ? 32 - __builtin_clz(d - 1) : 0;        /* ceil(log2 d) without a loop (once per row) */
    divisor_t v = {(uint32_t)((((uint64_t)1 << (31 + l)) + d - 1) / d), 31 + l};
    return v;
}

static inline uint32_t divide(uint32_t n, divisor_t d) { return (uint32_t)(((uint64_t)n * (uint64_t)d.m) >> d.shift); }

/* divide() on 16 lanes: 32 x 32 -> 64-bit products of the even and the odd lanes, shifted, interleaved */
__attribute__((target("avx512f,avx512bw")))
static inline __m512i divide16(__m512i n, divisor_t d) {
    __m512i m = _mm512_set1_epi64(d.m);
    __m128i sh = _mm_cvtsi32_si128(d.shift);
    __m512i even = _mm512_srl_epi64(_mm512_mul_epu32(n, m), sh);
    __m512i odd = _mm512_srl_epi64(_mm512_mul_epu32(_mm512_srli_epi64(n, 32), m), sh);
    return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

static inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }
/* 16 int32 lanes stored, masked only when some lane is (a masked store is slower on Zen 4 even with every lane set) */
__attribute__((target("avx512f")))
static inline void store32x16(int32_t *p, __m512i y, __mmask16 k) {
    if (k == 0xFFFF) _mm512_storeu_si512(p, y);
    else _mm512_mask_storeu_epi32(p, k, y);
}

static inline __mmask64 tail_mask64(int64_t left) { return left >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << left) - 1; }

static int has_avx512(void) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

/* int.requant's arithmetic on 16 lanes (int32 wrap-around, like the scalar code) */
__attribute__((target("avx512f,avx512bw")))
static inline __m512i tdiv_pow2_16(__m512i x, int p) {
    if (!p) return x;
    __m512i neg = _mm512_srli_epi32(_mm512_srai_epi32(x, 31), (unsigned)(32 - p));
    return _mm512_srai_epi32(_mm512_add_epi32(x, neg), (unsigned)p);
}

__attribute__((target("avx512f,avx512bw")))
static inline __m512i clamp16(__m512i y, int k, int32_t lo, int32_t hi) {      /* clamp(y >> k, lo, hi) */
    y = _mm512_srai_epi32(y, (unsigned)k);
    return _mm512_min_epi32(_mm512_max_epi32(y, _mm512_set1_epi32(lo)), _mm512_set1_epi32(hi));
}

/* int.shiftgelu on 16 lanes, computed instead of looked up (a 2^in_bits-entry table gather costs more):
 * e = shift_pow2(|x|) by shifts (X = 2^logx), then sig = (num 2^bits + den / 2) / den with den = e + one in
 * [2^(n+1) X, 2^(n+2) X]. The quotient is at most 2^bits: a float estimate from rcp14 (relative error
 * < 2^-14, so off by at most one for bits <= 13) is corrected by the exact remainder in int32, where
 * q den <= a + den < 2^31 (the op's X 2^(n+1+bits) <= 2^30). gelu_direct says when this applies. The
 * constants are made once per epilogue call (gelu_consts), outside the loops that store through `out`. */
typedef struct { __m512i one, lo, hi, top, xm1, twox, n, cap, ai; __m512 a; __m128i logx, bits; } gelu_consts_t;

__attribute__((target("avx512f,avx512bw")))
static inline gelu_consts_t gelu_consts(const epilogue_t *e) {
    int32_t X = e->gelu_x, n = e->gelu_n, half_in = 1 << (e->gelu_in_bits - 1);
    return (gelu_consts_t){_mm512_set1_epi32(2 * X << n), _mm512_set1_epi32(-half_in), _mm512_set1_epi32(half_in - 1),
                           _mm512_set1_epi32(n * X), _mm512_set1_epi32(X - 1), _mm512_set1_epi32(2 * X),
                           _mm512_set1_epi32(n), _mm512_set1_epi32(1 << e->gelu_bits),
                           _mm512_set1_epi32((2 * X << n) << e->gelu_bits),
                           _mm512_set1_ps((float)(2 * X << n) * (float)(1 << e->gelu_bits)),
                           _mm_cvtsi32_si128(__builtin_ctz((uint32_t)X)), _mm_cvtsi32_si128(e->gelu_bits)};
}

__attribute__((target("avx512f,avx512bw"), always_inline))
static inline __m512i gelu_den16(__m512i u, const gelu_consts_t *g, __m512i *ex) {
    *ex = _mm512_sllv_epi32(_mm512_sub_epi32(g->twox, _mm512_and_si512(u, g->xm1)),
                            _mm512_sub_epi32(g->n, _mm512_srl_epi32(u, g->logx)));
    return _mm512_add_epi32(*ex, g->one);
}

/* shiftgelu16's factor with half its work (the GELU epilogue of DeiT-S's fc1: 0.91-0.93x): den is even (ex and
 * one are), so for x >= 0 the factor is F = floor(A / den + 1/2) with A = one 2^bits, and for x < 0 it is 2^bits - F
 * (the numerators sum to den 2^bits, and A / den + 1/2 is never an integer when bits >= 1: den would be 2A). F is
 * est + [A - est den >= den / 2] for est = trunc(A rcp14(den)), which is exact when est is F or F - 1; whether it
 * is for every u on this CPU (rcp14's last bits differ between vendors) gelu_fast_exact checks. */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline __m512i gelu_sig_fast16(__m512i u, __mmask16 neg, const gelu_consts_t *g) {
    __m512i ex, den = gelu_den16(u, g, &ex);
    __m512i q = _mm512_cvttps_epi32(_mm512_mul_ps(g->a, _mm512_rcp14_ps(_mm512_cvtepi32_ps(den))));
    __m512i rem = _mm512_sub_epi32(g->ai, _mm512_mullo_epi32(q, den));        /* one 2^bits - q den */
    q = _mm512_mask_add_epi32(q, _mm512_cmpge_epi32_mask(rem, _mm512_srli_epi32(den, 1)), q, _mm512_set1_epi32(1));
    return _mm512_mask_sub_epi32(q, neg, g->cap, q);
}

__attribute__((target("avx512f,avx512bw"), always_inline))
static inline __m512i shiftgelu16(__m512i x, const gelu_consts_t *g) {
    const __m512i zero = _mm512_setzero_si512(), ones = _mm512_set1_epi32(1);
    x = _mm512_min_epi32(_mm512_max_epi32(x, g->lo), g->hi);
    __m512i u = _mm512_min_epi32(_mm512_abs_epi32(x), g->top), ex;
    __m512i den = gelu_den16(u, g, &ex);
    __m512i num = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(x, zero), g->one, ex);
    __m512i a = _mm512_add_epi32(_mm512_sll_epi32(num, g->bits), _mm512_srli_epi32(den, 1));
    __m512i sig = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_rcp14_ps(_mm512_cvtepi32_ps(den))));
    __m512i rem = _mm512_sub_epi32(a, _mm512_mullo_epi32(sig, den));
    sig = _mm512_mask_sub_epi32(sig, _mm512_cmplt_epi32_mask(rem, zero), sig, ones);
    sig = _mm512_mask_add_epi32(sig, _mm512_cmpge_epi32_mask(rem, den), sig, ones);
    return _mm512_mullo_epi32(x, sig);
}

/* shiftgelu16's preconditions: X a power of two, bits <= 13, the op's own bound, a sane input width. */
static int gelu_direct(const epilogue_t *e) {
    int64_t X = e->gelu_x, n = e->gelu_n, bits = e->gelu_bits;
    return X > 0 && (X & (X - 1)) == 0 && n >= 0 && n <= 24 && bits >= 0 && bits <= 13 &&
           (X << (n + 1 + bits)) <= (1LL << 30) && e->gelu_in_bits >= 1 && e->gelu_in_bits <= 24;
}

/* [lo, hi] narrowed so that y + zp stays within shiftgelu's in_bits input range, whose clamp then folds into the
 * requant's (gelu_direct's in_bits; empty when the two ranges do not meet). */
static void gelu_input_range(const epilogue_t *e, int64_t *lo, int64_t *hi) {
    int64_t half_in = (int64_t)1 << (e->gelu_in_bits - 1);
    *lo = *lo > -half_in - e->zp ? *lo : -half_in - e->zp;
    *hi = *hi < half_in - 1 - e->zp ? *hi : half_in - 1 - e->zp;
}

/* Whether gelu_sig_fast16 equals shiftgelu16's factor for every u in [0, nX] and both signs (the factor depends on
 * nothing else) on this CPU, with den exact in float. At most 2^12 vectors, once per GEMM (DeiT-S: 81). */
__attribute__((target("avx512f,avx512bw")))
static int gelu_fast_exact(const epilogue_t *e) {
    int64_t X = e->gelu_x, top = (int64_t)e->gelu_n * X;
    if (e->gelu_bits < 1 || top >= (1 << 16) || (4 * X << e->gelu_n) > (1 << 24)) return 0;
    gelu_consts_t g = gelu_consts(e), wide = g;     /* wide: no input clamp, u may exceed the input range */
    wide.lo = _mm512_set1_epi32(INT32_MIN + 1);
    wide.hi = _mm512_set1_epi32(INT32_MAX);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t u0 = 0; u0 <= top; u0 += 16) {
        __m512i u = _mm512_min_epi32(_mm512_add_epi32(_mm512_set1_epi32((int32_t)u0), iota), g.top);
        for (int neg = 0; neg < 2; neg++) {    /* x = +-u with |x| <= nX: shiftgelu16's factor is x's product / x */
            __m512i x = neg ? _mm512_sub_epi32(_mm512_setzero_si512(), u) : u;
            __m512i exact = shiftgelu16(x, &wide), fast = _mm512_mullo_epi32(x, gelu_sig_fast16(u, neg ? 0xFFFF : 0, &g));
            if (_mm512_cmpneq_epi32_mask(exact, fast)) return 0;
        }
    }
    return 1;
}

/* 16 lanes stored at out + o as BYTES-wide values (bytes: the low 8 bits of each). */
__attribute__((target("avx512f"), always_inline))
static inline void store_lanes16(void *out, int64_t o, __mmask16 mask, __m512i y, const int BYTES) {
    if (BYTES == 1) _mm512_mask_cvtepi32_storeu_epi8((int8_t *)out + o, mask, y);
    else store32x16((int32_t *)out + o, y, mask);
}

/* The last clamp to [lo, hi], the zero point and the store of 16 lanes at out + o. Bytes of [-128, 127] with zp 0
 * or 128 (narrow: the usual u8 / s8 activations) take one saturating narrowing and a flip of the top bit instead. */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
static inline void clamp_store16(void *out, int64_t o, __mmask16 mask, __m512i y, __m512i lo, __m512i hi, __m512i zp,
                                 int narrow, __m128i flip, const int BYTES) {
    if (BYTES == 1 && narrow)
        _mm_mask_storeu_epi8((int8_t *)out + o, mask, _mm_xor_si128(_mm512_cvtsepi32_epi8(y), flip));
    else store_lanes16(out, o, mask, _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(y, lo), hi), zp), BYTES);
}

static int narrows(int32_t lo, int32_t hi, int32_t zp) { return lo == -128 && hi == 127 && (zp == 0 || zp == 128); }

/* One column block's constants of an epilogue: the per-column vectors, loaded once per 16 columns, and the shifts (in
 * a local: stores through out, which may alias anything, would make them reloaded from e). */
typedef struct {
    __m512i bias, m, c, mb, m2, c2, shift, lo, hi, zp, lo2, hi2, zp2;
    __m128i flip;
    __mmask16 mask;
    int narrow, pre, pb, pre2, k2;
} cols16_t;

/* Rows r .. r + U - 1 (U <= 4) of the tile's 16 columns at c0 (out column col): each step for all U rows before the
 * next, so that U independent chains interleave. The GELU epilogue's chain is ~40 vector ops deep; with U = 4 it ran
 * 12 % faster on Zen 4 (fc1: 0.96-0.97x). The shorter chains of the other kinds gained nothing, and take U = 1. */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
static inline void rows16(const epilogue_t *e, const cols16_t *k, const gelu_consts_t *g, const int32_t *table,
                          const int32_t *tile, int64_t row0, int r, int c0, int64_t col, void *out, int64_t ldo,
                          const int U, const int KIND, const int BYTES, const int GELU) {
    const int two = KIND == EPI_TABLE_REQUANT || KIND == EPI_REQUANT2;       /* a second requant ends it */
    const __m512i zero = _mm512_setzero_si512();
    __m512i y[4];                  /* a fixed size (U is not a C constant), so that y[] can stay in registers */
    for (int i = 0; i < U; i++) y[i] = _mm512_add_epi32(_mm512_load_si512(tile + (r + i) * NR + c0), k->bias);
    if (KIND == EPI_RAW) {
        for (int i = 0; i < U; i++) store_lanes16(out, (row0 + r + i) * ldo + col, k->mask, y[i], BYTES);
        return;
    }
    for (int i = 0; i < U; i++) y[i] = _mm512_add_epi32(_mm512_mullo_epi32(tdiv_pow2_16(y[i], k->pre), k->m), k->c);
    if (KIND == EPI_ADD)
        for (int i = 0; i < U; i++) {
            __m512i res = _mm512_maskz_loadu_epi32(k->mask, e->res + (row0 + r + i) * e->ldr + col);
            y[i] = _mm512_add_epi32(y[i], _mm512_mullo_epi32(tdiv_pow2_16(res, k->pb), k->mb));
        }
    for (int i = 0; i < U; i++) y[i] = _mm512_srav_epi32(y[i], k->shift);
    if (KIND == EPI_REQUANT || KIND == EPI_ADD) {
        for (int i = 0; i < U; i++)
            clamp_store16(out, (row0 + r + i) * ldo + col, k->mask, y[i], k->lo, k->hi, k->zp, k->narrow, k->flip, BYTES);
        return;
    }
    for (int i = 0; i < U; i++) y[i] = _mm512_min_epi32(_mm512_max_epi32(y[i], k->lo), k->hi);
    if (GELU == 2) {            /* x sig, whose tdiv by 2^pre2 rounds toward zero by x's sign */
        const __m512i pm2 = _mm512_set1_epi32((1 << k->pre2) - 1);
        __m512i x[4];
        __mmask16 neg[4];
        for (int i = 0; i < U; i++) {
            x[i] = _mm512_add_epi32(y[i], k->zp);
            neg[i] = _mm512_cmplt_epi32_mask(x[i], zero);
        }
        for (int i = 0; i < U; i++)
            y[i] = _mm512_mullo_epi32(x[i], gelu_sig_fast16(_mm512_min_epi32(_mm512_abs_epi32(x[i]), g->top), neg[i], g));
        for (int i = 0; i < U; i++)
            y[i] = _mm512_srai_epi32(_mm512_mask_add_epi32(y[i], neg[i], y[i], pm2), (unsigned)k->pre2);
    } else {
        for (int i = 0; i < U; i++) {
            if (GELU) y[i] = shiftgelu16(_mm512_add_epi32(y[i], k->zp), g);
            else if (KIND == EPI_TABLE || KIND == EPI_TABLE_REQUANT)
                y[i] = _mm512_mask_i32gather_epi32(zero, k->mask, y[i], table, 4);
            else y[i] = _mm512_add_epi32(y[i], k->zp);
        }
        if (!two) {                                   /* EPI_TABLE: the table's value as it is */
            for (int i = 0; i < U; i++) store_lanes16(out, (row0 + r + i) * ldo + col, k->mask, y[i], BYTES);
            return;
        }
        for (int i = 0; i < U; i++) y[i] = tdiv_pow2_16(y[i], k->pre2);
    }
    for (int i = 0; i < U; i++)
        y[i] = _mm512_srai_epi32(_mm512_add_epi32(_mm512_mullo_epi32(y[i], k->m2), k->c2), (unsigned)k->k2);
    for (int i = 0; i < U; i++)
        clamp_store16(out, (row0 + r + i) * ldo + col, k->mask, y[i], k->lo2, k->hi2, k->zp2, k->narrow, k->flip, BYTES);
}

/* The epilogue of one tile on 16-lane vectors, for one kind and output width fixed at compile time (an
 * instance each, picked once per GEMM): the row loop holds no branch on either, and the per-column constants
 * are loaded once per 16 columns. The table lookup indexes from table - lo, so y needs no offset; with GELU
 * (EPI_TABLE_REQUANT only) int.shiftgelu(y + zp) is computed instead: GELU 1 as shiftgelu16, GELU 2 with
 * gelu_sig_fast16 and the input clamp folded into the requant's (gelu_fast_ok). */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
static inline void epilogue16(const epilogue_t *e, const int32_t *tile, int64_t row0, int mr, int64_t col0, int nr,
                              void *out, int64_t ldo, const int KIND, const int BYTES, const int GELU) {
    const int32_t *table = KIND == EPI_TABLE || KIND == EPI_TABLE_REQUANT ? e->table - e->lo : NULL;
    const int two = KIND == EPI_TABLE_REQUANT || KIND == EPI_REQUANT2;
    gelu_consts_t g;
    if (GELU) g = gelu_consts(e);
    int64_t lo1 = e->lo, hi1 = e->hi;
    if (GELU == 2) gelu_input_range(e, &lo1, &hi1);
    cols16_t k;
    k.pre = e->pre;
    k.pb = e->pb;
    k.pre2 = e->pre2;
    k.k2 = e->k2;
    k.narrow = two ? narrows(e->lo2, e->hi2, e->zp2) : narrows(e->lo, e->hi, e->zp);
    k.flip = _mm_set1_epi8((two ? e->zp2 : e->zp) ? (char)0x80 : 0);
    k.lo = _mm512_set1_epi32((int32_t)lo1);
    k.hi = _mm512_set1_epi32((int32_t)hi1);
    k.zp = _mm512_set1_epi32(e->zp);
    k.lo2 = _mm512_set1_epi32(e->lo2);
    k.hi2 = _mm512_set1_epi32(e->hi2);
    k.zp2 = _mm512_set1_epi32(e->zp2);
    for (int c0 = 0; c0 < nr; c0 += 16) {
        int64_t col = col0 + c0;
        __mmask16 mask = k.mask = tail_mask(nr - c0);
        __m512i zero = _mm512_setzero_si512();
        k.bias = _mm512_maskz_loadu_epi32(mask, e->bias + col);
        k.shift = e->ks ? _mm512_maskz_loadu_epi32(mask, e->ks + col) : _mm512_set1_epi32(e->k);
        k.m = KIND != EPI_RAW ? _mm512_maskz_loadu_epi32(mask, e->m + col) : zero;
        k.c = KIND != EPI_RAW ? _mm512_maskz_loadu_epi32(mask, e->c + col) : zero;
        k.mb = KIND == EPI_ADD ? _mm512_maskz_loadu_epi32(mask, e->mb + col) : zero;
        k.m2 = two ? _mm512_maskz_loadu_epi32(mask, e->m2 + col) : zero;
        k.c2 = two ? _mm512_maskz_loadu_epi32(mask, e->c2 + col) : zero;
        int r = 0;
        if (GELU)
            for (; r + 4 <= mr; r += 4) rows16(e, &k, &g, table, tile, row0, r, c0, col, out, ldo, 4, KIND, BYTES, GELU);
        for (; r < mr; r++) rows16(e, &k, &g, table, tile, row0, r, c0, col, out, ldo, 1, KIND, BYTES, GELU);
    }
}

typedef void (*epilogue_fn)(const epilogue_t *, const int32_t *, int64_t, int, int64_t, int, void *, int64_t);

#define EPILOGUE16(KIND, BYTES) EPILOGUE16_(KIND, BYTES, 0, KIND##_##BYTES)
#define EPILOGUE16_(KIND, BYTES, GELU, NAME) \
    __attribute__((target("avx512f,avx512bw,avx512vl"))) \
    static void epilogue16_##NAME(const epilogue_t *e, const int32_t *tile, int64_t row0, int mr, \
                                  int64_t col0, int nr, void *out, int64_t ldo) { \
        epilogue16(e, tile, row0, mr, col0, nr, out, ldo, KIND, BYTES, GELU); \
    }
EPILOGUE16(EPI_RAW, 1) EPILOGUE16(EPI_REQUANT, 1) EPILOGUE16(EPI_TABLE, 1) EPILOGUE16(EPI_ADD, 1)
EPILOGUE16(EPI_TABLE_REQUANT, 1) EPILOGUE16(EPI_RAW, 4) EPILOGUE16(EPI_REQUANT, 4) EPILOGUE16(EPI_TABLE, 4)
EPILOGUE16(EPI_ADD, 4) EPILOGUE16(EPI_TABLE_REQUANT, 4) EPILOGUE16(EPI_REQUANT2, 1) EPILOGUE16(EPI_REQUANT2, 4)
EPILOGUE16_(EPI_TABLE_REQUANT, 1, 1, gelu_1) EPILOGUE16_(EPI_TABLE_REQUANT, 4, 1, gelu_4)
EPILOGUE16_(EPI_TABLE_REQUANT, 1, 2, gelu_fast_1) EPILOGUE16_(EPI_TABLE_REQUANT, 4, 2, gelu_fast_4)

/* The GELU epilogue's second instance (GELU 2): gelu_sig_fast16 where gelu_fast_exact, with the input clamp folded
 * into the requant's (the two ranges meet, zp adds without int32 overflow) and x sig without overflow, so its sign is
 * x's for the tdiv by 2^pre2. */
static int gelu_fast_ok(const epilogue_t *e) {
    if (!gelu_direct(e) || e->zp <= -(1 << 30) || e->zp >= (1 << 30)) return 0;
    int64_t lo = e->lo, hi = e->hi;
    gelu_input_range(e, &lo, &hi);
    return lo <= hi && e->gelu_in_bits + e->gelu_bits <= 31 && e->pre2 >= 0 && e->pre2 < 31 && gelu_fast_exact(e);
}

/* Whether GEMMs with e's GELU epilogue take gelu_sig_fast16 on this CPU (at the current ISA limit). */
int go_gelu_division_free(const epilogue_t *e) {
    return isa_limit >= 1 && go_has_vnni() && e->kind == EPI_TABLE_REQUANT && gelu_fast_ok(e);
}

/* The AVX-512 epilogue instance for e's kind and output width. */
static epilogue_fn epilogue_avx512(const epilogue_t *e) {
    static const epilogue_fn by_kind[2][EPI_REQUANT2 + 1] = {
        {epilogue16_EPI_RAW_1, epilogue16_EPI_REQUANT_1, epilogue16_EPI_TABLE_1, epilogue16_EPI_ADD_1,
         epilogue16_EPI_TABLE_REQUANT_1, NULL, epilogue16_EPI_REQUANT2_1},
        {epilogue16_EPI_RAW_4, epilogue16_EPI_REQUANT_4, epilogue16_EPI_TABLE_4, epilogue16_EPI_ADD_4,
         epilogue16_EPI_TABLE_REQUANT_4, NULL, epilogue16_EPI_REQUANT2_4}};
    if (e->kind == EPI_TABLE_REQUANT && gelu_fast_ok(e))
        return e->out_type == OUT_I32 ? epilogue16_gelu_fast_4 : epilogue16_gelu_fast_1;
    if (e->kind == EPI_TABLE_REQUANT && gelu_direct(e))
        return e->out_type == OUT_I32 ? epilogue16_gelu_4 : epilogue16_gelu_1;
    return by_kind[e->out_type == OUT_I32][e->kind];
}

static void epilogue(const epilogue_t *e, const int32_t *tile, int64_t row0, int mr, int64_t col0, int nr,
                     void *out, int64_t ldo) {
    for (int r = 0; r < mr; r++) {
        const int32_t *t = tile + r * NR;
        int64_t o = (row0 + r) * ldo + col0;
        const int32_t *bias = e->bias + col0;
        const int32_t *m = e->m + col0, *c = e->c + col0;
        int32_t y[NR];
        if (e->kind == EPI_RAW) {
            for (int n = 0; n < nr; n++) y[n] = t[n] + bias[n];
        } else if (e->kind == EPI_ADD) {
            const int32_t *res = e->res + (row0 + r) * e->ldr + col0, *mb = e->mb + col0;
            for (int n = 0; n < nr; n++)
                y[n] = wrap_madd(tdiv_pow2(t[n] + bias[n], e->pre), m[n],
                                 wrap_madd(tdiv_pow2(res[n], e->pb), mb[n], c[n]));
        } else {
            for (int n = 0; n < nr; n++) y[n] = wrap_madd(tdiv_pow2(t[n] + bias[n], e->pre), m[n], c[n]);
        }
        if (e->kind != EPI_RAW)
            for (int n = 0; n < nr; n++) y[n] = clamp32(y[n] >> (e->ks ? e->ks[col0 + n] : e->k), e->lo, e->hi);
        if (e->kind == EPI_TABLE || e->kind == EPI_TABLE_REQUANT)
            for (int n = 0; n < nr; n++) y[n] = e->table[y[n] - e->lo];
        if (e->kind == EPI_REQUANT2)
            for (int n = 0; n < nr; n++) y[n] += e->zp;
        if (e->kind == EPI_TABLE_REQUANT || e->kind == EPI_REQUANT2)
            for (int n = 0; n < nr; n++)
                y[n] = requant1(y[n], e->m2[col0 + n], e->c2[col0 + n], e->pre2, e->k2, e->lo2, e->hi2) + e->zp2;
        else if (e->kind == EPI_REQUANT || e->kind == EPI_ADD)
            for (int n = 0; n < nr; n++) y[n] += e->zp;
        if (e->out_type == OUT_U8) for (int n = 0; n < nr; n++) ((uint8_t *)out)[o + n] = (uint8_t)y[n];
        else if (e->out_type == OUT_I8) for (int n = 0; n < nr; n++) ((int8_t *)out)[o + n] = (int8_t)y[n];
        else memcpy((int32_t *)out + o, y, sizeof(int32_t) * nr);
    }
}

/* AMX: a 32 x 32 block from two A tiles (16 rows x 64 k) and two B tiles (16 k4-groups x 16 columns),
 * K % 64 == 0. The packed panel's rows are 128 bytes apart (NR columns x 4 bytes). */
typedef struct { uint8_t palette, start_row, pad[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config_t;

__attribute__((target("amx-tile,amx-int8")))
static void amx_configure(void) {
    tile_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile,amx-int8")))
static void amx_release(void) { _tile_release(); }

__attribute__((target("amx-tile,amx-int8")))
static void block_amx(const uint8_t *a, int64_t lda, const int8_t *bp, int64_t K, int32_t *tile) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kk = 0; kk < K; kk += 64) {
        _tile_loadd(4, a + kk, lda);
        _tile_loadd(5, a + 16 * lda + kk, lda);
        _tile_loadd(6, bp + kk / 4 * NR * 4, NR * 4);
        _tile_loadd(7, bp + kk / 4 * NR * 4 + 64, NR * 4);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, tile, NR * 4);
    _tile_stored(1, tile + 16, NR * 4);
    _tile_stored(2, tile + 16 * NR, NR * 4);
    _tile_stored(3, tile + 16 * NR + 16, NR * 4);
}

/* The epilogue function for e on this ISA level (picked once per GEMM: a GELU's may be checked first). */
static epilogue_fn epilogue_for(int isa, const epilogue_t *e) { return isa >= 1 ? epilogue_avx512(e) : epilogue; }

/* One worker's share of a GEMM: row blocks [b0, b1) of out = finish(e, A x packed B), with the ISA chosen
 * by the caller (AMX needs K % 64 == 0, the others K % 4 == 0) and finish = epilogue_for(isa, e). tail: AMX_M * K
 * bytes of scratch for the zero-padded last rows (AMX tiles always read 32 rows). */
static void gemm_blocks(int isa, const uint8_t *A, int64_t lda, int64_t M, int64_t K, const int8_t *bp, int64_t N,
                        const epilogue_t *e, epilogue_fn finish, void *out, int64_t ldo, int64_t b0, int64_t b1,
                        uint8_t *tail) {
    int32_t tile[AMX_M * NR] __attribute__((aligned(64)));
    int64_t panels = (N + NR - 1) / NR, bm = isa == 2 ? AMX_M : MR;
    for (int64_t blk = b0; blk < b1; blk++) {
        int64_t row0 = blk * bm;
        int mr = (int)(M - row0 < bm ? M - row0 : bm);
        const uint8_t *a = A + row0 * lda;
        int64_t la = lda;
        if (isa == 2 && mr < AMX_M) {
            memset(tail, 0, (size_t)(AMX_M * K));
            for (int r = 0; r < mr; r++) memcpy(tail + r * K, a + r * lda, (size_t)K);
            a = tail;
            la = K;
        }
        for (int64_t p = 0; p < panels; p++) {
            const int8_t *panel = bp + p * (K / 4) * NR * 4;
            if (e->kind == EPI_ADD)          /* the residual tile arrives while the tile is computed */
                for (int r = 0; r < mr; r++) {
                    const int32_t *res = e->res + (row0 + r) * e->ldr + p * NR;
                    _mm_prefetch((const char *)res, _MM_HINT_T0);
                    _mm_prefetch((const char *)(res + 16), _MM_HINT_T0);
                }
            int nr = (int)(N - p * NR < NR ? N - p * NR : NR);
            if (isa == 2) block_amx(a, la, panel, K, tile);
            else if (isa == 1) tile_vnni[nr > 16][mr](a, la, panel, K / 4, tile);
            else tile_portable(a, la, mr, panel, K / 4, tile);
            finish(e, tile, row0, mr, p * NR, nr, out, ldo);
        }
    }
}

static int pick_isa(int64_t K) {
    if (isa_limit >= 2 && K % 64 == 0 && go_has_amx()) return 2;
    return isa_limit >= 1 && go_has_vnni() ? 1 : 0;
}

/* ---- GEMM threading: chunks of row blocks on the helper-thread pool of go_pool.h ---- */
typedef struct {
    int isa;
    const uint8_t *A;
    int64_t lda, M, K;
    const int8_t *bp;
    int64_t N;
    const epilogue_t *e;
    epilogue_fn finish;
    void *out;
    int64_t ldo, blocks, chunk;
    const int64_t *list;                     /* live: the row blocks to compute (NULL: all blocks) */
    const uint8_t *live;
} gemm_job_t;

/* With AMX a thread's scratch is its tail buffer, and its tiles stay configured until amx_fini. */
static void amx_fini(void *tail) {
    amx_release();
    free(tail);
}

static void gemm_chunk(const void *arg, int64_t c, void **scratch) {
    const gemm_job_t *j = arg;
    if (!*scratch && j->isa == 2) {
        amx_configure();
        *scratch = malloc((size_t)(AMX_M * j->K));
    }
    int64_t b0 = c * j->chunk, b1 = b0 + j->chunk < j->blocks ? b0 + j->chunk : j->blocks;
    if (!j->list) {
        gemm_blocks(j->isa, j->A, j->lda, j->M, j->K, j->bp, j->N, j->e, j->finish, j->out, j->ldo, b0, b1, *scratch);
        return;
    }
    int64_t bm = j->isa == 2 ? AMX_M : MR, osize = j->e->out_type == OUT_I32 ? 4 : 1;
    for (int64_t b = b0; b < b1; b++) {
        int64_t blk = j->list[b];
        gemm_blocks(j->isa, j->A, j->lda, j->M, j->K, j->bp, j->N, j->e, j->finish, j->out, j->ldo, blk, blk + 1, *scratch);
        for (int64_t r = blk * bm; r < (blk + 1) * bm && r < j->M; r++)    /* a live block's dead rows */
            if (!j->live[r]) memset((char *)j->out + r * j->ldo * osize, 0, (size_t)(j->N * osize));
    }
}

/* live: the row blocks of bm rows with a live row, in list (returned count); the others' rows zeroed. */
static int64_t live_blocks(const uint8_t *live, int64_t M, int64_t bm, int64_t N, int64_t ldo, int64_t osize,
                           void *out, int64_t *list) {
    int64_t n = 0;
    for (int64_t r0 = 0; r0 < M; r0 += bm) {
        int64_t r1 = r0 + bm < M ? r0 + bm : M, any = 0;
        for (int64_t r = r0; r < r1 && !any; r++) any = live[r];
        if (any) list[n++] = r0 / bm;
        else for (int64_t r = r0; r < r1; r++) memset((char *)out + r * ldo * osize, 0, (size_t)(N * osize));
    }
    return n;
}

/* out[M, N] = epilogue(A[M, K] (u8, row stride lda, K % 4 == 0) x packed B). */
void go_gemm(const uint8_t *A, int64_t lda, int64_t M, int64_t K, const int8_t *bp, int64_t N,
             const epilogue_t *e, void *out, int64_t ldo, const uint8_t *live, int threads) {
    int isa = pick_isa(K);
    int64_t bm = isa == 2 ? AMX_M : MR, blocks = (M + bm - 1) / bm, *list = NULL;
    if (live) {                              /* the live blocks, spread evenly over the threads */
        list = malloc(sizeof(int64_t) * (size_t)(blocks > 0 ? blocks : 1));
        blocks = live_blocks(live, M, bm, N, ldo, e->out_type == OUT_I32 ? 4 : 1, out, list);
    }
    int64_t chunk = pool_chunk(blocks, threads, 1);
    gemm_job_t j = {isa, A, lda, M, K, bp, N, e, epilogue_for(isa, e), out, ldo, blocks, chunk, list, live};
    if (blocks) pool_run(threads, (blocks + chunk - 1) / chunk, gemm_chunk, amx_fini, &j);
    free(list);
}

/* Shiftmax parameters: pow2[u] = shift_pow2(u, X, n) for u in [0, n X]; mask (NULL: none) holds bools
 * at mask + i0 m0 + i1 m1 + row mr + j for batch (i0, i1), row, column j; masked-out columns get e = 0.
 * sizes (NULL: none) adds proportional attention (int.lookup of token sizes, then add) to the logits before
 * Shiftmax: x += table[clamp(sizes[i0 s0 + i1 s1 + row sr + j], 0, tlen - 1)] (int32 wrap-around), or, with
 * logits (NULL: none, else EPI_ADD_REQUANT), x = requant2(int.add(x, that term)): the order token_merge then
 * integer_only makes, where the term joins the matmul's int32 accumulator before the scores' requant. */
#define MASKED_LOGIT (-(1 << 30))      /* int.shiftmax's logit of a masked column */

typedef struct {
    const int32_t *pow2;
    int32_t X, n, bits, pad_;
    const uint8_t *mask;
    int64_t m0, m1, mr;
    const int32_t *sizes;
    int64_t s0, s1, sr;
    const int32_t *table;
    int32_t tlen, pad2_;
    const epilogue_t *logits;
} softmax_t;

static void softmax_rows(const softmax_t *sm, const int32_t *x, int own, int64_t i0, int64_t i1, int64_t r0,
                         int64_t rows, int64_t L, int32_t *e, int32_t *xb, int32_t *bias, uint8_t *out);

typedef struct {
    const uint8_t *A;
    int64_t sa1, sa2, sam;
    const int8_t *B;
    int64_t sb1, sb2, sbk, sbn;
    int32_t b_flip, a_zp;
    int64_t B2, M, K, N, padk, osize, parts;   /* parts: chunks per batch item, row blocks split evenly */
    int isa, compact;                          /* compact: drop the key columns the Shiftmax mask masks */
    int zero_k;                                /* drop the k where a row block's A is all zero (a_zp 0) */
    const epilogue_t *e;
    const softmax_t *sm;
    void *out;
    const uint8_t *live;                       /* live[i1 l1 + i2 l2 + row lr] (NULL: every row) */
    int64_t l1, l2, lr;
    int64_t so1, so2, som;                     /* out's strides (elements) over i1, i2 and rows; unit along N */
} bmm_job_t;

/* The rows of [r0, r1) of item (i1, i2) that are live: how many; dead ones zeroed in o when zero is set. */
static int64_t live_rows(const bmm_job_t *j, int64_t i1, int64_t i2, int64_t r0, int64_t r1, char *o, int zero) {
    if (!j->live) return r1 - r0;
    const uint8_t *l = j->live + i1 * j->l1 + i2 * j->l2;
    int64_t n = 0;
    for (int64_t r = r0; r < r1; r++)
        if (l[r * j->lr]) n++;
        else if (zero) memset(o + r * j->som * j->osize, 0, (size_t)(j->N * j->osize));
    return n;
}

typedef struct {                            /* one thread's buffers for go_bmm, carved from one allocation */
    int isa;
    int8_t *bp;
    uint8_t *ap, *tail;
    int32_t *colsum, *bias, *scores, *erow, *xb, *brow;
    int8_t *bkept;                          /* compact: B's kept columns [K, kept]; zero_k: B's kept rows */
    int32_t *keep, *mkept, *ckept;          /* compact: the kept columns, their m and c; zero_k: the kept k */
    uint8_t *any;                           /* zero_k: per k, whether a row of the block is nonzero there */
    uint8_t *pkept;                         /* compact: one row's probabilities over the kept columns */
} bmm_scratch_t;

static void bmm_fini(void *p) {
    bmm_scratch_t *w = p;
    if (w->isa == 2) amx_release();
    free(w);
}

/* The next 64-byte aligned piece of `bytes` at *at (advancing it). */
static void *carve(char **at, int64_t bytes) {
    void *p = *at;
    *at += (bytes + 63) / 64 * 64;
    return p;
}

/* scores holds one row block's int32 rows (Shiftmax runs block by block). */
static bmm_scratch_t *bmm_scratch(const bmm_job_t *j) {
    const softmax_t *sm = j->sm;
    int64_t M = j->M, N = j->N, padk = j->padk, rows_padded = (M + AMX_M - 1) / AMX_M * AMX_M, n4 = 4 * N;
    int64_t c = j->compact, z = j->zero_k, keep4 = 4 * (N > j->K ? N : j->K);
    int64_t bytes[] = {go_packed_size(N, padk), rows_padded * padk, AMX_M * padk, n4, n4, sm ? AMX_M * n4 : 0,
                       sm ? n4 : 0, sm && sm->sizes ? 2 * n4 : 0, sm && sm->sizes ? n4 : 0, c || z ? j->K * N : 0,
                       c || z ? keep4 : 0, c ? n4 : 0, c ? n4 : 0, c ? N : 0, c || z ? (padk > N ? padk : N) + 64 : 0};
    int64_t total = 64 * 3;
    for (int t = 0; t < 15; t++) total += (bytes[t] + 63) / 64 * 64;
    bmm_scratch_t *w = aligned_alloc(64, (size_t)total);
    char *at = (char *)w + 64 * 3;          /* the struct itself in the first 192 bytes */
    w->isa = j->isa;
    w->bp = carve(&at, bytes[0]);
    w->ap = carve(&at, bytes[1]);
    w->tail = carve(&at, bytes[2]);
    w->colsum = carve(&at, bytes[3]);
    w->bias = carve(&at, bytes[4]);
    w->scores = carve(&at, bytes[5]);
    w->erow = carve(&at, bytes[6]);
    w->xb = carve(&at, bytes[7]);
    w->brow = carve(&at, bytes[8]);
    w->bkept = carve(&at, bytes[9]);
    w->keep = carve(&at, bytes[10]);
    w->mkept = carve(&at, bytes[11]);
    w->ckept = carve(&at, bytes[12]);
    w->pkept = carve(&at, bytes[13]);
    w->any = carve(&at, bytes[14]);
    if (j->isa == 2) amx_configure();
    return w;
}

/* ---- go_bmm's per-item packing of B on AVX-512: the layout of pack_strided (zero padding included) ---- */
/* n contiguous (element (n, k) at b[k sk + n]): each k4 group of a panel is 4 rows of 32 bytes, interleaved
 * byte by byte with one dword permute across the 4 rows and one in-lane byte shuffle. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void pack_rows_avx512(const int8_t *b, int64_t sk, int64_t N, int64_t K, int64_t Kpad, int flip, int8_t *out,
                             int32_t *colsum) {
    int64_t K4 = (Kpad + 3) / 4;
    const __m512i idx0 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
    const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(4));
    const __m512i spread = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t p = 0; p * NR < N; p++) {
        int64_t nr = N - p * NR < NR ? N - p * NR : NR;
        __mmask32 cols = nr == NR ? 0xFFFFFFFFu : (__mmask32)((1u << nr) - 1);
        __m256i x = _mm256_maskz_set1_epi8(cols, flip ? (char)0x80 : 0);
        __m512i s0 = _mm512_setzero_si512(), s1 = s0;
        int8_t *dst = out + p * K4 * NR * 4;
        for (int64_t g = 0; g < K4; g++) {
            __m256i r[4];
            for (int t = 0; t < 4; t++) {
                int64_t k = 4 * g + t;
                r[t] = k < K ? _mm256_xor_si256(_mm256_maskz_loadu_epi8(cols, b + k * sk + p * NR), x)
                             : _mm256_setzero_si256();
            }
            __m512i lo = _mm512_inserti64x4(_mm512_castsi256_si512(r[0]), r[1], 1);
            __m512i hi = _mm512_inserti64x4(_mm512_castsi256_si512(r[2]), r[3], 1);
            __m512i o0 = _mm512_shuffle_epi8(_mm512_permutex2var_epi32(lo, idx0, hi), spread);
            __m512i o1 = _mm512_shuffle_epi8(_mm512_permutex2var_epi32(lo, idx1, hi), spread);
            _mm512_storeu_si512(dst + g * NR * 4, o0);
            _mm512_storeu_si512(dst + g * NR * 4 + 64, o1);
            s0 = _mm512_dpbusd_epi32(s0, ones, o0);
            s1 = _mm512_dpbusd_epi32(s1, ones, o1);
        }
        _mm512_mask_storeu_epi32(colsum + p * NR, (__mmask16)cols, s0);
        _mm512_mask_storeu_epi32(colsum + p * NR + 16, (__mmask16)(cols >> 16), s1);
    }
}

/* r[0..15] as a 16 x 16 dword matrix, transposed in place: 4 rounds of 16 shuffles. */
__attribute__((target("avx512f"), always_inline))
static inline void transpose16x16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {                /* lane l: r_i[4l], r_i+1[4l], r_i[4l+1], r_i+1[4l+1] ... */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int q = 0; q < 16; q += 4) {                /* r[q + c], lane l: rows q .. q + 3 of column 4l + c */
        r[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
        r[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
        r[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
        r[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
    }
    for (int c = 0; c < 4; c++) {                    /* lanes 0, 1 (0x44) and 2, 3 (0xEE) of rows 0-7 and 8-15 */
        t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);
        t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
        t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    }
    for (int c = 0; c < 4; c++) {                    /* column 4l + c: lane l of each group of 4 rows */
        r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD);
    }
}

/* k contiguous (element (n, k) at b[n sn + k]): 16 columns x 64 k at a time, each column's 64 bytes one
 * masked load (zero past K, flipped only where loaded), transposed as 16 x 16 dwords into 16 k4 groups (a dword
 * gather per group cost 70 % of packing attention's K^T on Zen 4). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void pack_cols_avx512(const int8_t *b, int64_t sn, int64_t N, int64_t K, int64_t Kpad, int flip, int8_t *out,
                             int32_t *colsum) {
    int64_t K4 = (Kpad + 3) / 4;
    const __m512i ones = _mm512_set1_epi8(1), x = _mm512_set1_epi8((char)0x80);
    for (int64_t p = 0; p * NR < N; p++) {
        int8_t *dst = out + p * K4 * NR * 4;
        for (int h = 0; h < 2; h++) {
            int64_t n0 = p * NR + 16 * h;
            __m512i s = _mm512_setzero_si512();
            for (int64_t g0 = 0; g0 < K4; g0 += 16) {
                __mmask64 in = 4 * g0 >= K ? 0 : tail_mask64(K - 4 * g0);
                __m512i r[16];
                __m512i fx = flip ? _mm512_maskz_mov_epi8(in, x) : _mm512_setzero_si512();
                for (int j = 0; j < 16; j++)
                    r[j] = n0 + j < N ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, b + (n0 + j) * sn + 4 * g0), fx)
                                      : _mm512_setzero_si512();
                transpose16x16_epi32(r);
                for (int g = 0; g < 16 && g0 + g < K4; g++) {
                    _mm512_storeu_si512(dst + (g0 + g) * NR * 4 + 64 * h, r[g]);
                    s = _mm512_dpbusd_epi32(s, ones, r[g]);
                }
            }
            if (n0 < N) _mm512_mask_storeu_epi32(colsum + n0, tail_mask(N - n0), s);
        }
    }
}

/* B of one batch item packed like pack_strided, by the AVX-512 packers when its layout fits them. */
static void pack_item(const bmm_job_t *j, const int8_t *b, int64_t sbk, int64_t sbn, int64_t N, int64_t K,
                      int64_t padk, int8_t *out, int32_t *colsum) {
    int vec = j->isa >= 1 && has_avx512();
    if (vec && sbn == 1) pack_rows_avx512(b, sbk, N, K, padk, j->b_flip, out, colsum);
    else if (vec && sbk == 1)
        pack_cols_avx512(b, sbn, N, K, padk, j->b_flip, out, colsum);
    else pack_strided(b, sbn, sbk, N, K, padk, j->b_flip, out, colsum);
}

/* out[n] = the next of p where flags[n] != 0, else 0, for n < N (vpexpandb: the inverse of compact_rows). */
__attribute__((target("avx512f,avx512bw,avx512vbmi2")))
static void expand_row(const uint8_t *p, const uint8_t *flags, int64_t N, uint8_t *out) {
    for (int64_t n = 0; n < N; n += 64) {
        __mmask64 in = tail_mask64(N - n);
        __m512i f = _mm512_maskz_loadu_epi8(in, flags + n);
        __mmask64 keep = _mm512_test_epi8_mask(f, f);
        int c = __builtin_popcountll(keep);
        __m512i v = _mm512_maskz_loadu_epi8(tail_mask64(c), p);
        _mm512_mask_storeu_epi8(out + n, in, _mm512_maskz_expand_epi8(keep, v));
        p += c;
    }
}

/* zero_k: rows r0 .. r1 of A with only the k where any[k] != 0, zero-padded to kp (vpcompressb, AVX512-VBMI2). */
__attribute__((target("avx512f,avx512bw,avx512vbmi2")))
static void compact_rows(const uint8_t *a, int64_t la, int64_t r0, int64_t r1, int64_t K, const uint8_t *any,
                         uint8_t *out, int64_t kp) {
    memset(out, 0, (size_t)((r1 - r0) * kp));
    for (int64_t r = r0; r < r1; r++) {
        uint8_t *o = out + (r - r0) * kp;
        for (int64_t k = 0; k < K; k += 64) {
            __mmask64 in = tail_mask64(K - k);
            __m512i flags = _mm512_maskz_loadu_epi8(in, any + k);
            __mmask64 keep = _mm512_test_epi8_mask(flags, flags);
            __m512i v = _mm512_maskz_compress_epi8(keep, _mm512_maskz_loadu_epi8(in, a + r * la + k));
            int n = __builtin_popcountll(keep);
            _mm512_mask_storeu_epi8(o, tail_mask64(n), v);
            o += n;
        }
    }
}

/* zero_k: the k where rows r0 .. r1 of A (row stride la) are not all zero, in w->keep; returns how many. */
__attribute__((target("avx512f,avx512bw")))
static int64_t nonzero_k(const uint8_t *a, int64_t la, int64_t r0, int64_t r1, int64_t K, bmm_scratch_t *w) {
    for (int64_t k = 0; k < K; k += 64) {
        __mmask64 in = tail_mask64(K - k);
        __m512i any = _mm512_setzero_si512();
        for (int64_t r = r0; r < r1; r++) any = _mm512_or_si512(any, _mm512_maskz_loadu_epi8(in, a + r * la + k));
        _mm512_mask_storeu_epi8(w->any + k, in, any);
    }
    int64_t kept = 0;
    for (int64_t k = 0; k < K; k++)
        if (w->any[k]) w->keep[kept++] = (int32_t)k;
    return kept;
}

/* Compaction (j->compact): the columns of item (i1, i2) its key mask keeps, in w->keep, with B's kept
 * columns copied to w->bkept and their m and c to w->mkept, w->ckept. Returns how many are kept. */
static int64_t keep_columns(const bmm_job_t *j, int64_t i1, int64_t i2, const int8_t *b, bmm_scratch_t *w) {
    const uint8_t *mask = j->sm->mask + i1 * j->sm->m0 + i2 * j->sm->m1;
    int64_t kept = 0, K = j->K;
    for (int64_t n = 0; n < j->N; n++) {
        w->any[n] = mask[n] != 0;
        if (mask[n]) w->keep[kept++] = (int32_t)n;
    }
    if (j->sbk == 1)                        /* K^T: each kept key's k are contiguous, copied as [kept, K] */
        for (int64_t t = 0; t < kept; t++) memcpy(w->bkept + t * K, b + w->keep[t] * j->sbn, (size_t)K);
    else
        for (int64_t k = 0; k < K; k++)
            for (int64_t t = 0; t < kept; t++) w->bkept[k * kept + t] = b[k * j->sbk + w->keep[t] * j->sbn];
    for (int64_t t = 0; t < kept; t++) {
        w->mkept[t] = j->e->m[w->keep[t]];
        w->ckept[t] = j->e->c[w->keep[t]];
    }
    return kept;
}

static void softmax_kept_row(const softmax_t *sm, const int32_t *x, int64_t kept, const int32_t *keep,
                             const uint8_t *flags, int64_t N, int32_t *e, uint8_t *p, uint8_t *out);

/* Part p of batch item i of go_bmm (its share of the row blocks; each part packs the item's B itself, so
 * items split into parts when there are too few items for the threads: batch 1 has 6 heads for 2 cores).
 * With Shiftmax each block's int32 scores are turned into its u8 rows while still in L1. When K % 4 != 0 the
 * k4 groups of a row read up to 3 bytes past it, which the packed B's zero rows cancel; those bytes lie
 * inside A (the next row's span) except after the item's last rows, so only the last block is copied with
 * zero padding (the part's blocks for AMX or a row stride < 3). */
static void bmm_item(const void *arg, int64_t chunk, void **scratch) {
    const bmm_job_t *j = arg;
    const softmax_t *sm = j->sm;
    if (!*scratch) *scratch = bmm_scratch(j);
    bmm_scratch_t *w = *scratch;
    int64_t i = chunk / j->parts, part = chunk % j->parts;
    int64_t M = j->M, K = j->K, N = j->N, padk = j->padk, i1 = i / j->B2, i2 = i % j->B2;
    int64_t bm = j->isa == 2 ? AMX_M : MR, blocks = (M + bm - 1) / bm, per = (blocks + j->parts - 1) / j->parts;
    int64_t first = part * per, last = first + per < blocks ? first + per : blocks;
    if (first >= last) return;
    char *o = (char *)j->out + (i1 * j->so1 + i2 * j->so2) * j->osize;
    if (j->live && !live_rows(j, i1, i2, first * bm, last * bm < M ? last * bm : M, o, 1)) return;
    epilogue_t eb = *j->e;
    eb.bias = w->bias;
    if (eb.kind == EPI_REQUANT2) {                        /* each item of the second batch dim: its N columns */
        eb.m2 += i2 * N;
        eb.c2 += i2 * N;
    }
    if (sm) eb.out_type = OUT_I32;
    const int8_t *b = j->B + i1 * j->sb1 + i2 * j->sb2;
    const uint8_t *a = j->A + i1 * j->sa1 + i2 * j->sa2;
    int64_t L = N, kd = padk;                             /* the GEMM's columns and (padded) depth */
    int64_t la = j->sam, copied = M;                      /* rows from `copied` on are read from w->ap */
    int64_t r0 = first * bm, r1 = last * bm < M ? last * bm : M, kept = j->zero_k ? nonzero_k(a, la, r0, r1, K, w) : K;
    if (j->zero_k && kept * 4 <= K * 3) {                 /* A's zero columns (a_zp 0) add nothing: drop them */
        kd = (kept + 3) / 4 * 4;
        for (int64_t t = 0; t < kept; t++)
            if (j->sbn == 1) memcpy(w->bkept + t * N, b + w->keep[t] * j->sbk, (size_t)N);
            else for (int64_t n = 0; n < N; n++) w->bkept[t * N + n] = b[w->keep[t] * j->sbk + n * j->sbn];
        pack_item(j, w->bkept, N, 1, N, kept, kd, w->bp, w->colsum);
        for (int64_t n = 0; n < N; n++) w->bias[n] = j->e->bias[n];
        compact_rows(a, la, r0, r1, K, w->any, w->ap, kd);
        copied = r0;
    } else if (j->compact) {
        L = keep_columns(j, i1, i2, b, w);
        if (j->sbk == 1) pack_item(j, w->bkept, 1, K, L, K, padk, w->bp, w->colsum);
        else pack_item(j, w->bkept, L, 1, L, K, padk, w->bp, w->colsum);
        for (int64_t t = 0; t < L; t++) w->bias[t] = j->e->bias[w->keep[t]] - j->a_zp * w->colsum[t];
        eb.m = w->mkept;
        eb.c = w->ckept;
    } else {
        pack_item(j, b, j->sbk, j->sbn, N, K, padk, w->bp, w->colsum);
        for (int64_t n = 0; n < N; n++) w->bias[n] = j->e->bias[n] - j->a_zp * w->colsum[n];
    }
    if (copied == M && padk != K) {
        int whole = j->isa == 2 || la < padk - K;
        int64_t p0 = whole ? r0 : last == blocks ? (blocks - 1) * bm : M, p1 = whole ? r1 : M;
        if (p0 < p1) {
            memset(w->ap, 0, (size_t)((p1 - p0) * padk));
            for (int64_t r = p0; r < p1; r++) memcpy(w->ap + (r - p0) * padk, a + r * la, (size_t)K);
            copied = p0;
        }
    }
    epilogue_fn finish = epilogue_for(j->isa, &eb);
    for (int64_t blk = first; blk < last; blk++) {        /* each row block as a GEMM of its own rows */
        int64_t row0 = blk * bm, rows = M - row0 < bm ? M - row0 : bm;
        if (j->live && !live_rows(j, i1, i2, row0, row0 + rows, o, 0)) continue;     /* its rows zeroed above */
        void *y = sm ? (void *)w->scores : o + row0 * j->som * j->osize;
        if (j->e->res) eb.res = j->e->res + row0 * eb.ldr;
        int64_t ldy = sm ? L : j->som;
        if (L && row0 < copied) gemm_blocks(j->isa, a + row0 * la, la, rows, kd, w->bp, L, &eb, finish, y, ldy, 0, 1, w->tail);
        else if (L) gemm_blocks(j->isa, w->ap + (row0 - copied) * kd, kd, rows, kd, w->bp, L, &eb, finish, y, ldy, 0, 1, w->tail);
        if (j->compact)
            for (int64_t r = 0; r < rows; r++)
                softmax_kept_row(sm, w->scores + r * L, L, w->keep, w->any, N, w->erow, w->pkept,
                                 (uint8_t *)o + (row0 + r) * j->som);
        else if (sm) softmax_rows(sm, w->scores, 1, i1, i2, row0, rows, N, w->erow, w->xb, w->brow, (uint8_t *)o + row0 * N);
        live_rows(j, i1, i2, row0, row0 + rows, o, 1);
    }
}

/* Whether every row of each item's mask equals its first row: a key padding mask stored per query row, as
 * Hugging Face's [B, 1, T, T] attention masks are (a memcmp per row; items a zero stride repeats are read once). */
static int mask_rows_alike(const softmax_t *sm, int64_t B1, int64_t B2, int64_t M, int64_t N) {
    for (int64_t i1 = 0; i1 < (sm->m0 ? B1 : 1); i1++)
        for (int64_t i2 = 0; i2 < (sm->m1 ? B2 : 1); i2++) {
            const uint8_t *first = sm->mask + i1 * sm->m0 + i2 * sm->m1;
            for (int64_t r = 1; r < M; r++)
                if (memcmp(first + r * sm->mr, first, (size_t)N)) return 0;
        }
    return 1;
}

/* Batched out[i, j] = epilogue(A[i, j] x B[i, j]) over batch dims (B1, B2); A[i, j] is M x K with unit k
 * stride, B[i, j] is K x N with any strides (s8, or u8 with b_zp 128 taken as s8), out M x N with unit n stride
 * and strides so1, so2, som (elements; so an attention's [B, H, T, D] is written as [B, T, H, D]), contiguous
 * with Shiftmax.
 * a_zp enters the per-batch column correction; with sm != NULL the epilogue (int32) feeds Shiftmax rows
 * and out is u8. Parallel over the batch, each item cut into parts when the items alone give fewer than
 * ~8 chunks a thread. */
void go_bmm(const uint8_t *A, int64_t sa1, int64_t sa2, int64_t sam, const int8_t *B, int64_t sb1, int64_t sb2,
            int64_t sbk, int64_t sbn, int32_t b_flip, int64_t B1, int64_t B2, int64_t M, int64_t K, int64_t N,
            int32_t a_zp, const epilogue_t *e, const softmax_t *sm, void *out, const uint8_t *live, int64_t l1,
            int64_t l2, int64_t lr, int64_t so1, int64_t so2, int64_t som, int threads) {
    int64_t Kp = (K + 63) / 64 * 64, items = B1 * B2;
    if (sm) {                                         /* Shiftmax rows are written whole, item after item */
        so1 = B2 * M * N;
        so2 = M * N;
        som = N;
    }
    int isa = pick_isa(Kp);
    int64_t blocks = (M + (isa == 2 ? AMX_M : MR) - 1) / (isa == 2 ? AMX_M : MR);
    int64_t parts = threads > 1 && items < 8 * threads ? (8 * threads + items - 1) / items : 1;
    parts = parts < blocks ? parts : blocks < 1 ? 1 : blocks;
    /* A key padding mask (the same for every row) drops its masked columns from the GEMM when nothing but
     * the mask can make a score as low as the masked logit (a requant's lo above it) */
    softmax_t one_row;
    if (sm && sm->mask && sm->mr && mask_rows_alike(sm, B1, B2, M, N)) {
        one_row = *sm;
        one_row.mr = 0;
        sm = &one_row;
    }
    int compact = sm && sm->mask && sm->mr == 0 && !sm->sizes && !sm->logits && e->kind == EPI_REQUANT && !e->res &&
                  !e->ks && e->lo > MASKED_LOGIT;
    /* probabilities times V: the keys a mask zeroed are zero columns of A, dropped when a_zp is 0 */
    int zero_k = !sm && a_zp == 0 && isa == 1 && K >= 32 && __builtin_cpu_supports("avx512vbmi2");
    bmm_job_t j = {A, sa1, sa2, sam, B, sb1, sb2, sbk, sbn, b_flip, a_zp, B2, M, K, N,
                   isa == 2 ? Kp : (K + 3) / 4 * 4, sm ? 1 : e->out_type == OUT_I32 ? 4 : 1, parts, isa, compact, zero_k,
                   e, sm, out, live, l1, l2, lr, so1, so2, som};
    pool_run(threads, items * parts, bmm_item, bmm_fini, &j);
}

/* ---- Shiftmax over rows of length L (int.shiftmax: masked columns count as -2^30, then e = 0) ---- */

static void shiftmax_row_portable(const int32_t *restrict xr, int64_t L, const uint8_t *restrict mask,
                                  const softmax_t *sm, int32_t *restrict e, uint8_t *restrict o) {
    int32_t nX = sm->n * sm->X, mx = INT32_MIN;
    for (int64_t j = 0; j < L; j++) {
        int32_t v = !mask || mask[j] ? xr[j] : MASKED_LOGIT;
        mx = v > mx ? v : mx;
    }
    uint32_t s = 0;
    for (int64_t j = 0; j < L; j++) {
        int keep = !mask || mask[j];
        int32_t u = (int32_t)((uint32_t)mx - (uint32_t)(keep ? xr[j] : MASKED_LOGIT));
        e[j] = keep ? sm->pow2[clamp32(u, 0, nX)] : 0;
        s += (uint32_t)e[j];
    }
    int32_t si = (int32_t)s < 1 ? 1 : (int32_t)s;
    divisor_t d = make_divisor((uint32_t)si);
    uint32_t half = (uint32_t)(si / 2), top = (1u << sm->bits) - 1;
    for (int64_t j = 0; j < L; j++) {
        uint32_t q = divide(((uint32_t)e[j] << sm->bits) + half, d);
        o[j] = (uint8_t)(q < top ? q : top);
    }
}

/* shift_pow2 on 16 lanes of u in [0, nX]: by shifts when X = 2^logx, else a table gather */
__attribute__((target("avx512f,avx512bw")))
static inline __m512i pow2_16(__m512i u, const int32_t *pow2, int32_t n, int logx, __mmask16 k) {
    if (logx < 0) return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, u, pow2, 4);
    int32_t X = 1 << logx;
    __m512i q = _mm512_srli_epi32(u, (unsigned)logx), r = _mm512_and_si512(u, _mm512_set1_epi32(X - 1));
    __m512i v = _mm512_sllv_epi32(_mm512_sub_epi32(_mm512_set1_epi32(2 * X), r),
                                  _mm512_sub_epi32(_mm512_set1_epi32(n), q));
    return _mm512_maskz_mov_epi32(k, v);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __mmask16 keep_mask(const uint8_t *mask, int64_t j, __mmask16 k) {
    if (!mask) return k;
    __m128i v = _mm_maskz_loadu_epi8(k, mask + j);
    return _mm_test_epi8_mask(v, v) & k;
}

/* Shiftmax's e for columns j .. j + 16 U - 1 (mask k: U = 1 only) into e, their sum added to *vs; each step for
 * all U vectors before the next, as rows16 (4 at a time: the row 10 % faster than one). */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
static inline void shiftmax_exp16(const int32_t *xr, const uint8_t *mask, const softmax_t *sm, int logx, __m512i vm,
                                  int32_t *e, int64_t j, __mmask16 k, __m512i *vs, const int U) {
    __m512i u[4], top = _mm512_set1_epi32(sm->n * sm->X), zero = _mm512_setzero_si512();
    __mmask16 keep[4];
    for (int i = 0; i < U; i++) {
        keep[i] = mask ? keep_mask(mask, j + 16 * i, k) : k;
        u[i] = _mm512_sub_epi32(vm, _mm512_maskz_loadu_epi32(k, xr + j + 16 * i));
    }
    for (int i = 0; i < U; i++) u[i] = _mm512_min_epi32(_mm512_max_epi32(u[i], zero), top);
    for (int i = 0; i < U; i++) u[i] = pow2_16(u[i], sm->pow2, sm->n, logx, keep[i]);
    for (int i = 0; i < U; i++) {
        store32x16(e + j + 16 * i, u[i], k);
        *vs = _mm512_add_epi32(*vs, u[i]);
    }
}

/* Shiftmax's output for columns j .. j + 16 U - 1: min((e << bits + sum / 2) / sum, 2^bits - 1), as shiftmax_exp16. */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
static inline void shiftmax_out16(const int32_t *e, __m128i bits, __m512i half, __m512i cap, divisor_t d, uint8_t *o,
                                  int64_t j, __mmask16 k, const int U) {
    __m512i v[4];
    for (int i = 0; i < U; i++) v[i] = _mm512_add_epi32(_mm512_sll_epi32(_mm512_maskz_loadu_epi32(k, e + j + 16 * i), bits), half);
    for (int i = 0; i < U; i++) v[i] = _mm512_min_epu32(divide16(v[i], d), cap);
    for (int i = 0; i < U; i++) _mm512_mask_cvtepi32_storeu_epi8(o + j + 16 * i, k, v[i]);
}

/* Shiftmax of R rows, L apart in xr, e and o (mask: R = 1 only), each pass for all R before the next: a row's passes
 * each wait on one reduction (the max, then the sum and its divisor), which the other row's work fills (R = 2, on
 * unmasked rows whose e may overwrite their logits). */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
static inline void shiftmax_rows_avx512(const int32_t *xr, int64_t L, const uint8_t *mask, const softmax_t *sm,
                                        int32_t *e, uint8_t *o, const int R) {
    softmax_t s = *sm;                      /* a copy the stores to e and o cannot alias: fields stay in registers */
    int logx = s.X > 0 && (s.X & (s.X - 1)) == 0 ? __builtin_ctz((uint32_t)s.X) : -1;   /* shift_pow2 by shifts */
    __m512i masked = _mm512_set1_epi32(MASKED_LOGIT), vmx[2], vm[2], vs[2], half[2];
    divisor_t d[2];
    for (int i = 0; i < R; i++) vmx[i] = _mm512_set1_epi32(INT32_MIN);
    for (int64_t j = 0; j < L; j += 16) {
        __mmask16 k = tail_mask(L - j);
        for (int i = 0; i < R; i++) {
            __m512i x = _mm512_maskz_loadu_epi32(k, xr + i * L + j);
            if (mask) x = _mm512_mask_blend_epi32(keep_mask(mask, j, k), masked, x);
            vmx[i] = _mm512_mask_max_epi32(vmx[i], k, vmx[i], x);
        }
    }
    for (int i = 0; i < R; i++) {
        vm[i] = _mm512_set1_epi32(_mm512_reduce_max_epi32(vmx[i]));
        vs[i] = _mm512_setzero_si512();
    }
    int64_t j = 0;
    for (; j + 64 <= L; j += 64)
        for (int i = 0; i < R; i++) shiftmax_exp16(xr + i * L, mask, &s, logx, vm[i], e + i * L, j, 0xFFFF, &vs[i], 4);
    for (; j < L; j += 16)
        for (int i = 0; i < R; i++)
            shiftmax_exp16(xr + i * L, mask, &s, logx, vm[i], e + i * L, j, tail_mask(L - j), &vs[i], 1);
    for (int i = 0; i < R; i++) {
        int32_t si = _mm512_reduce_add_epi32(vs[i]);
        si = si < 1 ? 1 : si;
        d[i] = make_divisor((uint32_t)si);
        half[i] = _mm512_set1_epi32(si / 2);
    }
    __m512i cap = _mm512_set1_epi32((1 << s.bits) - 1);
    __m128i b = _mm_cvtsi32_si128(s.bits);
    for (j = 0; j + 64 <= L; j += 64)
        for (int i = 0; i < R; i++) shiftmax_out16(e + i * L, b, half[i], cap, d[i], o + i * L, j, 0xFFFF, 4);
    for (; j < L; j += 16)
        for (int i = 0; i < R; i++) shiftmax_out16(e + i * L, b, half[i], cap, d[i], o + i * L, j, tail_mask(L - j), 1);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static void shiftmax_row_avx512(const int32_t *restrict xr, int64_t L, const uint8_t *restrict mask,
                                const softmax_t *sm, int32_t *restrict e, uint8_t *restrict o) {
    shiftmax_rows_avx512(xr, L, mask, sm, e, o, 1);
}

/* Two unmasked rows of x, each row's e written over its logits. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void shiftmax_2rows_avx512(int32_t *x, int64_t L, const softmax_t *sm, uint8_t *o) {
    shiftmax_rows_avx512(x, L, NULL, sm, x, o, 2);
}

/* bias[j] = table[clamp(sizes[j], 0, tlen - 1)] for one row of the proportional-attention term */
static void size_bias(const softmax_t *sm, int64_t i0, int64_t i1, int64_t row, int64_t L, int32_t *bias) {
    const int32_t *sz = sm->sizes + i0 * sm->s0 + i1 * sm->s1 + row * sm->sr;
    for (int64_t j = 0; j < L; j++) bias[j] = sm->table[clamp32(sz[j], 0, sm->tlen - 1)];
}

/* y[j] = requant(m2, c2)(int.add(x[j], b[j]) with ma = m, mb, c) per column j: the EPI_ADD_REQUANT logits */
static void add_requant_row(const epilogue_t *g, const int32_t *x, const int32_t *b, int64_t L, int32_t *y) {
    for (int64_t j = 0; j < L; j++) {
        int32_t v = wrap_madd(tdiv_pow2(x[j], g->pre), g->m[j], wrap_madd(tdiv_pow2(b[j], g->pb), g->mb[j], g->c[j]));
        v = clamp32(v >> g->k, g->lo, g->hi) + g->zp;
        y[j] = requant1(v, g->m2[j], g->c2[j], g->pre2, g->k2, g->lo2, g->hi2) + g->zp2;
    }
}

/* int.add on 16 lanes of columns c0 on: requant(tdiv(a, 2^pre) m + tdiv(b, 2^pb) mb + c) + zp, with per-column
 * m, mb, c (int32 wrap-around, as the scalar code; tail lanes masked by k), in its two halves: b's term (add_b16),
 * then a's and the requant (add_a16). */
__attribute__((target("avx512f,avx512bw")))
static inline __m512i add_b16(const epilogue_t *e, __m512i b, int64_t c0, __mmask16 k) {
    return _mm512_add_epi32(_mm512_mullo_epi32(tdiv_pow2_16(b, e->pb), _mm512_maskz_loadu_epi32(k, e->mb + c0)),
                            _mm512_maskz_loadu_epi32(k, e->c + c0));
}

__attribute__((target("avx512f,avx512bw")))
static inline __m512i add_a16(const epilogue_t *e, __m512i a, __m512i b_term, int64_t c0, __mmask16 k) {
    __m512i v = _mm512_add_epi32(_mm512_mullo_epi32(tdiv_pow2_16(a, e->pre), _mm512_maskz_loadu_epi32(k, e->m + c0)),
                                 b_term);
    return _mm512_add_epi32(clamp16(v, e->k, e->lo, e->hi), _mm512_set1_epi32(e->zp));
}

/* add_requant_row on 16 lanes, in two steps: the size term's half of int.add, tdiv(b, 2^pb) mb + c, once per bias
 * row (in place: the same for every query row of an item unless sizes vary by row), then per query row the scores'
 * half and the requants (int32 wrap-around: the order of the adds changes nothing). Token merging's logits, 3.4 %
 * of a DeiT-S b8 + tm16 forward when scalar. */
__attribute__((target("avx512f,avx512bw")))
static void logit_bias_row_avx512(const epilogue_t *g, int32_t *b, int64_t L) {
    for (int64_t j = 0; j < L; j += 16) {
        __mmask16 t = tail_mask(L - j);
        _mm512_mask_storeu_epi32(b + j, t, add_b16(g, _mm512_maskz_loadu_epi32(t, b + j), j, t));
    }
}

/* logits_row_avx512's columns j .. j + 16 U - 1 (mask t: U = 1 only), each step for all U vectors before the next. */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void logits16(const epilogue_t *g, const int32_t *x, const int32_t *cb, int32_t *y, int64_t j,
                            __mmask16 t, const int U) {
    __m512i v[4];
    for (int i = 0; i < U; i++)
        v[i] = add_a16(g, _mm512_maskz_loadu_epi32(t, x + j + 16 * i), _mm512_maskz_loadu_epi32(t, cb + j + 16 * i),
                       j + 16 * i, t);
    for (int i = 0; i < U; i++)
        v[i] = _mm512_add_epi32(_mm512_mullo_epi32(tdiv_pow2_16(v[i], g->pre2), _mm512_maskz_loadu_epi32(t, g->m2 + j + 16 * i)),
                                _mm512_maskz_loadu_epi32(t, g->c2 + j + 16 * i));
    for (int i = 0; i < U; i++)
        store32x16(y + j + 16 * i, _mm512_add_epi32(clamp16(v[i], g->k2, g->lo2, g->hi2), _mm512_set1_epi32(g->zp2)), t);
}

__attribute__((target("avx512f,avx512bw")))
static void logits_row_avx512(const epilogue_t *logits, const int32_t *x, const int32_t *cb, int64_t L, int32_t *y) {
    epilogue_t g = *logits;                 /* a copy the stores to y cannot alias: fields stay in registers */
    int64_t j = 0;
    for (; j + 64 <= L; j += 64) logits16(&g, x, cb, y, j, 0xFFFF, 4);
    for (; j < L; j += 16) logits16(&g, x, cb, y, j, tail_mask(L - j), 1);
}

/* y = x + b over a row of L (int32 wrap-around, as the scalar loop): the size term added to the Shiftmax input */
__attribute__((target("avx512f")))
static void add_term_row_avx512(const int32_t *x, const int32_t *b, int64_t L, int32_t *y) {
    for (int64_t j = 0; j < L; j += 16) {
        __mmask16 t = tail_mask(L - j);
        _mm512_mask_storeu_epi32(y + j, t, _mm512_add_epi32(_mm512_maskz_loadu_epi32(t, x + j), _mm512_maskz_loadu_epi32(t, b + j)));
    }
}

/* Row `row`'s logits with the proportional-attention term, into xb (which may be xr); bias holds the term's row, made
 * anew when fresh. */
static void size_logits_row(const softmax_t *sm, const int32_t *xr, int64_t i0, int64_t i1, int64_t row, int64_t L,
                            int fresh, int vec, int32_t *bias, int32_t *xb) {
    if (fresh) {
        size_bias(sm, i0, i1, row, L, bias);
        if (sm->logits && vec) logit_bias_row_avx512(sm->logits, bias, L);
    }
    if (sm->logits && vec) logits_row_avx512(sm->logits, xr, bias, L, xb);
    else if (sm->logits) add_requant_row(sm->logits, xr, bias, L, xb);
    else if (vec) add_term_row_avx512(xr, bias, L, xb);
    else for (int64_t j = 0; j < L; j++) xb[j] = (int32_t)((uint32_t)xr[j] + (uint32_t)bias[j]);
}

/* Shiftmax of rows r0 .. r0 + rows of batch (i0, i1); e and bias are L-entry scratch rows, xb (with sizes) two.
 * Unmasked rows go two at a time (shiftmax_2rows_avx512: the DeiT-S scores bmm ran 2-8 % faster on Zen 4) over logits
 * they may overwrite: x itself when `own` (the bmm's scores, its scratch; the size term is added in place), else xb. */
static void softmax_rows(const softmax_t *sm, const int32_t *x, int own, int64_t i0, int64_t i1, int64_t r0,
                         int64_t rows, int64_t L, int32_t *e, int32_t *xb, int32_t *bias, uint8_t *out) {
    int vec = isa_limit >= 1 && has_avx512();
    int64_t r = 0;
    if (vec && !sm->mask && (own || sm->sizes))
        for (; r + 2 <= rows; r += 2) {
            int32_t *y = (int32_t *)x + r * L;
            if (sm->sizes) {
                int32_t *dst = own ? y : xb;
                for (int i = 0; i < 2; i++)
                    size_logits_row(sm, x + (r + i) * L, i0, i1, r0 + r + i, L, r + i == 0 || sm->sr, vec, bias, dst + i * L);
                y = dst;
            }
            shiftmax_2rows_avx512(y, L, sm, out + r * L);
        }
    for (; r < rows; r++) {
        const uint8_t *mask = sm->mask ? sm->mask + i0 * sm->m0 + i1 * sm->m1 + (r0 + r) * sm->mr : NULL;
        const int32_t *xr = x + r * L;
        if (sm->sizes) {                        /* the bias row is the same for every row unless sr != 0 */
            size_logits_row(sm, xr, i0, i1, r0 + r, L, r == 0 || sm->sr, vec, bias, xb);
            xr = xb;
        }
        if (vec) shiftmax_row_avx512(xr, L, mask, sm, e, out + r * L);
        else shiftmax_row_portable(xr, L, mask, sm, e, out + r * L);
    }
}

/* Shiftmax of one row over its kept columns (no mask left), scattered into the full row; the masked
 * columns get 0, as Shiftmax gives them (e = 0, and (0 << bits) + sum / 2 < sum). */
static void softmax_kept_row(const softmax_t *sm, const int32_t *x, int64_t kept, const int32_t *keep,
                             const uint8_t *flags, int64_t N, int32_t *e, uint8_t *p, uint8_t *out) {
    int vec = isa_limit >= 1 && has_avx512();
    if (kept && vec) shiftmax_row_avx512(x, kept, NULL, sm, e, p);
    else if (kept) shiftmax_row_portable(x, kept, NULL, sm, e, p);
    if (vec && __builtin_cpu_supports("avx512vbmi2")) {
        expand_row(p, flags, N, out);
        return;
    }
    memset(out, 0, (size_t)N);
    for (int64_t t = 0; t < kept; t++) out[keep[t]] = p[t];
}

/* ---- the row kernels: chunks of whole rows on the pool, each row with a C-entry int32 scratch row ---- */
typedef void (*row_fn)(const void *arg, int64_t r, int32_t *y);
typedef struct {
    row_fn row;
    const void *arg;
    int64_t rows, chunk, ints;
    const uint8_t *live;                     /* NULL: every row; else row r is computed when live[r], else zeroed */
    char *out;
    int64_t row_bytes;
} rows_job_t;

static void rows_chunk(const void *p, int64_t c, void **scratch) {
    const rows_job_t *j = p;
    if (!*scratch) *scratch = malloc(sizeof(int32_t) * (size_t)j->ints);
    int64_t r1 = (c + 1) * j->chunk < j->rows ? (c + 1) * j->chunk : j->rows;
    for (int64_t r = c * j->chunk; r < r1; r++)
        if (!j->live || j->live[r]) j->row(j->arg, r, *scratch);
        else memset(j->out + r * j->row_bytes, 0, (size_t)j->row_bytes);
}

/* row(arg, r, y) for r in [0, rows) (the live ones; the others' row_bytes at out zeroed), y `ints` int32 of the
 * thread's own; chunks of >= 8192 / C rows of C. */
static void run_rows(row_fn row, const void *arg, int64_t rows, int64_t C, int64_t ints, const uint8_t *live,
                     void *out, int64_t row_bytes, int threads) {
    int64_t chunk = pool_chunk(rows, threads, (1 << 13) / (C < 1 ? 1 : C));
    rows_job_t j = {row, arg, rows, chunk, ints, live, out, row_bytes};
    pool_run(threads, (rows + chunk - 1) / chunk, rows_chunk, free, &j);
}

typedef struct { const int32_t *x; int64_t D1, R, L; const softmax_t *sm; uint8_t *out; } shiftmax_job_t;

static void shiftmax_row(const void *arg, int64_t i, int32_t *e) {
    const shiftmax_job_t *j = arg;
    int64_t L = j->L;
    softmax_rows(j->sm, j->x + i * L, 0, i / (j->D1 * j->R), i / j->R % j->D1, i % j->R, 1, L, e, e + L, e + 2 * L,
                 j->out + i * L);
}

/* Shiftmax over x [D0, D1, R, L] (contiguous); parallel over D0 x D1 x R rows. */
void go_shiftmax(const int32_t *x, int64_t D0, int64_t D1, int64_t R, int64_t L, const softmax_t *sm, uint8_t *out,
                 int threads) {
    shiftmax_job_t j = {x, D1, R, L, sm, out};
    run_rows(shiftmax_row, &j, D0 * D1 * R, L, 3 * L, NULL, NULL, 0, threads);
}

/* ---- integer LayerNorm over rows of C (see int.layernorm), then optionally a per-channel requant ---- */
/* int.layernorm's isqrt: `iters` Newton steps k = (k + v / k) / 2 from 2^16, stopping at a fixed point. For
 * 1 <= v < 2^31 they fall strictly to s = floor(sqrt v) (never below it), and k - sqrt v at least halves each
 * step, so from 2^16 they reach s within 18 steps. There they stop, unless v = (s + 1)^2 - 1, where they
 * alternate s + 1, s, ... until `iters` runs out. So with iters >= 18 the answer is s, computed by one
 * double sqrt (exact: v < 2^53, and sqrt v is an integer or 1e-5 or more away from one), instead of ~10
 * dependent integer divisions; that alternating case and fewer iterations take the steps themselves. */
__attribute__((target("sse2")))
static inline int32_t isqrt_newton(int32_t v, int iters) {
    if (iters >= 18 && v >= 1) {
        int32_t s = _mm_cvttsd_si32(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd((double)v)));
        if ((int64_t)(s + 1) * (s + 1) - 1 != v) return s;
    }
    int32_t k = 1 << 16;
    for (int i = 0; i < iters; i++) {
        int32_t next = (k + v / k) / 2;
        if (next == k) break;                 /* a fixed point: every further step returns k */
        k = next;
    }
    return k;
}

static void store_row(void *out, int type, int64_t i0, const int32_t *y, int64_t n) {
    if (type == OUT_U8) for (int64_t j = 0; j < n; j++) ((uint8_t *)out)[i0 + j] = (uint8_t)y[j];
    else if (type == OUT_I8) for (int64_t j = 0; j < n; j++) ((int8_t *)out)[i0 + j] = (int8_t)y[j];
    else memcpy((int32_t *)out + i0, y, sizeof(int32_t) * (size_t)n);
}

__attribute__((target("avx512f,avx512bw")))
static inline void store16(void *out, int type, int64_t i, __m512i y, __mmask16 k) {
    if (type == OUT_U8) _mm512_mask_cvtepi32_storeu_epi8((uint8_t *)out + i, k, y);
    else if (type == OUT_I8) _mm512_mask_cvtepi32_storeu_epi8((int8_t *)out + i, k, y);
    else store32x16((int32_t *)out + i, y, k);
}

/* int.requant on 16 lanes of column c0 of a row, then the zero point (tail lanes masked by k). */
__attribute__((target("avx512f,avx512bw")))
static inline __m512i requant16(const epilogue_t *e, __m512i y, int64_t c0, __mmask16 k) {
    __m512i m = _mm512_maskz_loadu_epi32(k, e->m + c0), c = _mm512_maskz_loadu_epi32(k, e->c + c0);
    y = _mm512_add_epi32(_mm512_mullo_epi32(tdiv_pow2_16(y, e->pre), m), c);
    return _mm512_add_epi32(clamp16(y, e->k, e->lo, e->hi), _mm512_set1_epi32(e->zp));
}

typedef struct {
    const int32_t *x;
    int64_t C;
    int32_t sh, F, iters, half;
    const epilogue_t *rq;
    void *out;
} layernorm_job_t;

static void layernorm_row(const void *arg, int64_t r, int32_t *y) {
    const layernorm_job_t *job = arg;
    const epilogue_t *rq = job->rq;
    int64_t C = job->C;
    int32_t sh = job->sh, F = job->F, iters = job->iters, half = job->half;
    const int32_t *xr = job->x + r * C;
    uint32_t s = 0;
    for (int64_t j = 0; j < C; j++) s += (uint32_t)xr[j];
    int32_t mean = (int32_t)s / (int32_t)C;
    uint32_t var = 0;
    for (int64_t j = 0; j < C; j++) {
        int32_t v = xr[j] - mean;
        int32_t ys = tdiv_pow2(v + (v > 0 ? half : 0) - (v < 0 ? half : 0), sh);   /* half away from 0 */
        var += (uint32_t)ys * (uint32_t)ys;
    }
    int32_t v = (int32_t)var < 1 ? 1 : (int32_t)var;
    divisor_t d = make_divisor((uint32_t)isqrt_newton(v, iters) << sh);
    for (int64_t j = 0; j < C; j++) {
        int32_t a = (int32_t)((uint32_t)(xr[j] - mean) << F);
        uint32_t q = divide((uint32_t)(a < 0 ? -a : a), d);
        y[j] = a < 0 ? -(int32_t)q : (int32_t)q;
    }
    if (rq) {
        const int32_t *m = rq->m, *c = rq->c;
        for (int64_t j = 0; j < C; j++)
            y[j] = requant1(y[j], m[j], c[j], rq->pre, rq->k, rq->lo, rq->hi) + rq->zp;
    }
    store_row(job->out, rq ? rq->out_type : OUT_I32, r * C, y, C);
}

/* The normalised row's requant constants (the division's shift includes the requant's pre). */
typedef struct {
    __m512i mean, lo, hi, zp;
    __m128i F, k, flip;
    divisor_t d;
    int type, narrow;
} layernorm_out_t;

/* Columns j .. j + 16 U - 1 of a row (mask k: U = 1 only) normalised, requantised and stored at out + o + j, each step
 * for all U vectors before the next (as rows16: 4 at a time ran 8-12 % faster than one). */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
static inline void layernorm_out16(const epilogue_t *rq, const layernorm_out_t *c, const int32_t *xr, void *out,
                                   int64_t o, int64_t j, __mmask16 k, const int U) {
    __m512i a[4], q[4];
    for (int i = 0; i < U; i++)
        a[i] = _mm512_sll_epi32(_mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, xr + j + 16 * i), c->mean), c->F);
    for (int i = 0; i < U; i++)
        q[i] = _mm512_mullo_epi32(divide16(_mm512_abs_epi32(a[i]), c->d), _mm512_maskz_loadu_epi32(k, rq->m + j + 16 * i));
    for (int i = 0; i < U; i++) {            /* +-q m + c by a's sign, then >> k */
        __m512i cc = _mm512_maskz_loadu_epi32(k, rq->c + j + 16 * i);
        __mmask16 neg = _mm512_cmplt_epi32_mask(a[i], _mm512_setzero_si512());
        q[i] = _mm512_sra_epi32(_mm512_mask_sub_epi32(_mm512_add_epi32(cc, q[i]), neg, cc, q[i]), c->k);
    }
    for (int i = 0; i < U; i++)
        if (c->type == OUT_I32) clamp_store16(out, o + j + 16 * i, k, q[i], c->lo, c->hi, c->zp, 0, c->flip, 4);
        else clamp_store16(out, o + j + 16 * i, k, q[i], c->lo, c->hi, c->zp, c->narrow, c->flip, 1);
}

/* layernorm_row on 16 lanes: the statistics vectorised, the normalisation by divide16, the requant fused.
 * The variance's ys = y / 2^sh rounded half away from zero is squared, so only |ys| = (|y| + half) >> sh is needed;
 * that equals the op's int32 arithmetic unless y +- half wraps (some |y| > 2^31 - 1 - half), when the row takes
 * the op's own steps. The requant's tdiv by 2^pre joins the division's shift: floor(floor(|a| m / 2^s) / 2^pre) =
 * floor(|a| m / 2^(s + pre)), and tdiv(+-q, 2^pre) = +-floor(q / 2^pre), so a's sign is applied after the shift. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void layernorm_row_avx512(const void *arg, int64_t r, int32_t *y) {
    (void)y;
    const layernorm_job_t *job = arg;
    epilogue_t local;                       /* a copy the stores through out cannot alias: fields stay in registers */
    const epilogue_t *rq = job->rq ? (local = *job->rq, &local) : NULL;
    int64_t C = job->C;
    const int32_t *xr = job->x + r * C;
    __m512i zero = _mm512_setzero_si512(), sum = zero;
    for (int64_t j = 0; j < C; j += 16) sum = _mm512_add_epi32(sum, _mm512_maskz_loadu_epi32(tail_mask(C - j), xr + j));
    int32_t mean = (int32_t)(uint32_t)_mm512_reduce_add_epi32(sum) / (int32_t)C;
    __m512i vmean = _mm512_set1_epi32(mean), half = _mm512_set1_epi32(job->half), var = zero, widest = zero;
    __m128i sh = _mm_cvtsi32_si128(job->sh);
    for (int64_t j = 0; j < C; j += 16) {
        __mmask16 k = tail_mask(C - j);
        __m512i a = _mm512_maskz_abs_epi32(k, _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, xr + j), vmean));
        widest = _mm512_max_epu32(widest, a);
        __m512i ys = _mm512_srl_epi32(_mm512_add_epi32(a, half), sh);
        var = _mm512_add_epi32(var, _mm512_mullo_epi32(ys, ys));
    }
    if ((uint32_t)_mm512_reduce_max_epu32(widest) > (uint32_t)(INT32_MAX - job->half)) {    /* y +- half wraps */
        var = zero;
        for (int64_t j = 0; j < C; j += 16) {
            __mmask16 k = tail_mask(C - j);
            __m512i v = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, xr + j), vmean);
            __mmask16 pos = _mm512_cmpgt_epi32_mask(v, zero), neg = _mm512_cmplt_epi32_mask(v, zero);
            v = _mm512_mask_sub_epi32(_mm512_mask_add_epi32(v, pos, v, half), neg, v, half);
            __m512i ys = tdiv_pow2_16(v, job->sh);
            var = _mm512_add_epi32(var, _mm512_maskz_mullo_epi32(k, ys, ys));
        }
    }
    int32_t v = (int32_t)(uint32_t)_mm512_reduce_add_epi32(var);
    divisor_t d = make_divisor((uint32_t)isqrt_newton(v < 1 ? 1 : v, job->iters) << job->sh);
    __m128i F = _mm_cvtsi32_si128(job->F);
    if (!rq) {
        for (int64_t j = 0; j < C; j += 16) {
            __mmask16 k = tail_mask(C - j);
            __m512i a = _mm512_sll_epi32(_mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, xr + j), vmean), F);
            __m512i q = divide16(_mm512_abs_epi32(a), d);
            store32x16((int32_t *)job->out + r * C + j, _mm512_mask_sub_epi32(q, _mm512_cmplt_epi32_mask(a, zero), zero, q), k);
        }
        return;
    }
    d.shift += rq->pre;                     /* a shift of 64 or more gives 0, as the quotient by 2^pre is then */
    layernorm_out_t o = {vmean, _mm512_set1_epi32(rq->lo), _mm512_set1_epi32(rq->hi), _mm512_set1_epi32(rq->zp),
                         F, _mm_cvtsi32_si128(rq->k), _mm_set1_epi8(rq->zp ? (char)0x80 : 0), d,
                         rq->out_type, narrows(rq->lo, rq->hi, rq->zp)};
    int64_t j = 0;
    for (; j + 64 <= C; j += 64) layernorm_out16(rq, &o, xr, job->out, r * C, j, 0xFFFF, 4);
    for (; j < C; j += 16) layernorm_out16(rq, &o, xr, job->out, r * C, j, tail_mask(C - j), 1);
}

void go_layernorm(const int32_t *x, int64_t rows, int64_t C, int32_t sh, int32_t F, int32_t iters,
                  const epilogue_t *rq, void *out, const uint8_t *live, int threads) {
    layernorm_job_t j = {x, C, sh, F, iters, sh ? 1 << (sh - 1) : 0, rq, out};
    run_rows(isa_limit >= 1 && has_avx512() ? layernorm_row_avx512 : layernorm_row, &j, rows, C, C, live, out,
             C * (rq && rq->out_type != OUT_I32 ? 1 : 4), threads);
}

/* ---- int.requant over rows of C with per-column m, c (e->kind EPI_REQUANT), any 8/32-bit input ---- */
typedef struct { const void *x; int in_type; int64_t C; const epilogue_t *e; void *out; } requant_job_t;

static void requant_row(const void *arg, int64_t r, int32_t *y) {
    const requant_job_t *j = arg;
    const epilogue_t *e = j->e;
    int64_t C = j->C, i0 = r * C;
    if (j->in_type == OUT_U8) for (int64_t k = 0; k < C; k++) y[k] = ((const uint8_t *)j->x)[i0 + k];
    else if (j->in_type == OUT_I8) for (int64_t k = 0; k < C; k++) y[k] = ((const int8_t *)j->x)[i0 + k];
    else memcpy(y, (const int32_t *)j->x + i0, sizeof(int32_t) * (size_t)C);
    for (int64_t k = 0; k < C; k++)
        y[k] = requant1(y[k], e->m[k], e->c[k], e->pre, e->k, e->lo, e->hi) + e->zp;
    store_row(j->out, e->out_type, i0, y, C);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))     /* vl: the 16-byte loads of 8-bit rows */
static void requant_row_avx512(const void *arg, int64_t r, int32_t *y) {
    (void)y;
    const requant_job_t *j = arg;
    const epilogue_t e = *j->e;             /* a copy the stores through out cannot alias */
    int64_t C = j->C, i0 = r * C;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        __mmask16 k = tail_mask(C - c0);
        __m512i x;
        if (j->in_type == OUT_U8) x = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, (const uint8_t *)j->x + i0 + c0));
        else if (j->in_type == OUT_I8) x = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, (const int8_t *)j->x + i0 + c0));
        else x = _mm512_maskz_loadu_epi32(k, (const int32_t *)j->x + i0 + c0);
        store16(j->out, e.out_type, i0 + c0, requant16(&e, x, c0, k), k);
    }
}

void go_requant(const void *x, int in_type, int64_t rows, int64_t C, const epilogue_t *e, void *out,
                const uint8_t *live, int threads) {
    requant_job_t j = {x, in_type, C, e, out};
    run_rows(isa_limit >= 1 && has_avx512() ? requant_row_avx512 : requant_row, &j, rows, C, C, live, out,
             C * (e->out_type == OUT_I32 ? 4 : 1), threads);
}

/* ---- int.add over rows of C: requant(tdiv(a, 2^pre) m + tdiv(b, 2^pb) mb + c), per-column m, mb, c ---- */
typedef struct { const int32_t *a, *b; int64_t b_rows, C; const epilogue_t *e; void *out; } add_job_t;

static void add_row(const void *arg, int64_t r, int32_t *y) {
    const add_job_t *j = arg;
    const epilogue_t *e = j->e;
    int64_t C = j->C;
    const int32_t *ar = j->a + r * C, *br = j->b + r % j->b_rows * C;
    for (int64_t k = 0; k < C; k++) {
        int32_t v = wrap_madd(tdiv_pow2(ar[k], e->pre), e->m[k], wrap_madd(tdiv_pow2(br[k], e->pb), e->mb[k], e->c[k]));
        y[k] = clamp32(v >> e->k, e->lo, e->hi) + e->zp;
    }
    store_row(j->out, e->out_type, r * C, y, C);
}

__attribute__((target("avx512f,avx512bw")))
static void add_row_avx512(const void *arg, int64_t r, int32_t *y) {
    (void)y;
    const add_job_t *j = arg;
    const epilogue_t local = *j->e, *e = &local;    /* a copy the stores through out cannot alias */
    int64_t C = j->C, i0 = r * C;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
        __mmask16 k = tail_mask(C - c0);
        __m512i a = _mm512_maskz_loadu_epi32(k, j->a + i0 + c0);
        __m512i b = _mm512_maskz_loadu_epi32(k, j->b + r % j->b_rows * C + c0);
        store16(j->out, e->out_type, i0 + c0, add_a16(e, a, add_b16(e, b, c0, k), c0, k), k);
    }
}

/* Row r of b is row r % b_rows (b_rows = rows: b as large as a; fewer: b repeats, a broadcast nobody copies). */
void go_add(const int32_t *a, const int32_t *b, int64_t b_rows, int64_t rows, int64_t C, const epilogue_t *e,
            void *out, const uint8_t *live, int threads) {
    add_job_t j = {a, b, b_rows < 1 ? 1 : b_rows, C, e, out};
    run_rows(isa_limit >= 1 && has_avx512() ? add_row_avx512 : add_row, &j, rows, C, C, live, out,
             C * (e->out_type == OUT_I32 ? 4 : 1), threads);
}

/* ---- the replay's runs of recorded kernel calls (backends/cpu_integer_replay.py), one ctypes call a run ---- */
#define CALL_ARGS 32
typedef struct {
    const void *fn;
    int32_t check, pad_;                     /* check: 32 or 64, the int result compared with status; 0: none */
    int64_t status, got;
    uint64_t a[CALL_ARGS];
} go_call_t;

#if defined(__x86_64__) && defined(__linux__)
typedef int64_t (*call32_fn)(uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                             uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                             uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t,
                             uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t);

/* Calls calls[0 .. n) in order, fn(a[0], ..., a[31]). Only for kernels whose parameters are all integers and
 * pointers (the replay checks their ctypes argtypes): the x86-64 System V ABI passes each of those in the same
 * register or 8-byte stack slot whatever its width (an int reads the low half), and a callee never reads the
 * slots past its own parameters, which its caller pops. A checked call whose result (its low 32 bits with check
 * 32) is not status stops the run, its result in got. Returns the index of that call, else n. */
int64_t go_run_calls(go_call_t *calls, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const uint64_t *a = calls[i].a;
        int64_t r = ((call32_fn)calls[i].fn)(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
                                             a[11], a[12], a[13], a[14], a[15], a[16], a[17], a[18], a[19], a[20],
                                             a[21], a[22], a[23], a[24], a[25], a[26], a[27], a[28], a[29], a[30],
                                             a[31]);
        if (calls[i].check == 32) r = (int32_t)r;
        if (calls[i].check && r != calls[i].status) {
            calls[i].got = r;
            return i;
        }
    }
    return n;
}
#endif

