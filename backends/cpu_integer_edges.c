/* The float edges of an integer graph (int.quantize, int.dequantize of graphopt/ir/ops/integer.py) for the
 * cpu_integer backend, as loops the compiler vectorises (built with -ffp-contract=off: the reference rounds
 * after the multiply and again after the add, so a fused multiply-add would change results).
 *   ge_quantize    q = clamp(floor(x * inv + 0.5), lo, hi) + zp in float32, stored as u8 / i8 / i32
 *   ge_dequantize  y = (float)(x - zp) * scale[j] (+ offset[j]) over rows of C, per-column scale and offset
 */
#include <math.h>
#include <stdint.h>

enum { OUT_U8 = 0, OUT_I8 = 1, OUT_I32 = 2 };

static inline int32_t quantize1(float x, float inv, float lo, float hi, int32_t zp) {
    float y = floorf(x * inv + 0.5f);
    y = y < lo ? lo : y;                       /* comparisons keep a NaN as it is, like torch.clamp */
    y = y > hi ? hi : y;
    return (int32_t)((uint32_t)(int32_t)y + (uint32_t)zp);
}

void ge_quantize(const float *x, int64_t n, float inv, float lo, float hi, int32_t zp, int out_type, void *out,
                 int threads) {
    int64_t chunk = 1 << 16, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1)
    for (int64_t b = 0; b < chunks; b++) {
        int64_t i0 = b * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
        if (out_type == OUT_U8) for (int64_t i = i0; i < i1; i++) ((uint8_t *)out)[i] = (uint8_t)quantize1(x[i], inv, lo, hi, zp);
        else if (out_type == OUT_I8) for (int64_t i = i0; i < i1; i++) ((int8_t *)out)[i] = (int8_t)quantize1(x[i], inv, lo, hi, zp);
        else for (int64_t i = i0; i < i1; i++) ((int32_t *)out)[i] = quantize1(x[i], inv, lo, hi, zp);
    }
}

void ge_dequantize(const void *x, int in_type, int64_t rows, int64_t C, int32_t zp, const float *scale,
                   const float *offset, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * C > (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        float *o = out + r * C;
        int64_t i0 = r * C;
        if (in_type == OUT_U8) for (int64_t j = 0; j < C; j++) o[j] = (float)((int32_t)((const uint8_t *)x)[i0 + j] - zp) * scale[j];
        else if (in_type == OUT_I8) for (int64_t j = 0; j < C; j++) o[j] = (float)((int32_t)((const int8_t *)x)[i0 + j] - zp) * scale[j];
        else for (int64_t j = 0; j < C; j++) o[j] = (float)(int32_t)((uint32_t)((const int32_t *)x)[i0 + j] - (uint32_t)zp) * scale[j];
        if (offset) for (int64_t j = 0; j < C; j++) o[j] += offset[j];
    }
}
