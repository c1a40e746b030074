/* The machine's int8 VPDPBUSD peak: a loop of independent 512-bit accumulators that touches no memory,
 * run by `threads` OpenMP threads at once (bench/vnni_peak.py times it). Returns a value that depends
 * on every accumulator. 24 accumulators > latency x throughput of vpdpbusd: the loop is throughput-bound. */
#include <stdint.h>

__attribute__((target("avx512f,avx512bw,avx512vnni")))
int64_t vnni_peak(int64_t iters, int threads) {
    int64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int32_t sums[16] __attribute__((aligned(64)));
        int64_t n = iters;                 /* each thread counts down its own copy */
        /* zmm8..zmm31 accumulate zmm0 x zmm1 (GCC spills an accumulator array, so the loop is asm) */
        __asm__ volatile(
            "vpbroadcastd %[one], %%zmm0\n\tvpbroadcastd %[two], %%zmm1\n\t"
#define Z(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
            Z(8) Z(9) Z(10) Z(11) Z(12) Z(13) Z(14) Z(15) Z(16) Z(17) Z(18) Z(19)
            Z(20) Z(21) Z(22) Z(23) Z(24) Z(25) Z(26) Z(27) Z(28) Z(29) Z(30) Z(31)
#undef Z
            "1:\n\t"
#define D(i) "vpdpbusd %%zmm1, %%zmm0, %%zmm" #i "\n\t"
            D(8) D(9) D(10) D(11) D(12) D(13) D(14) D(15) D(16) D(17) D(18) D(19)
            D(20) D(21) D(22) D(23) D(24) D(25) D(26) D(27) D(28) D(29) D(30) D(31)
#undef D
            "dec %[n]\n\tjnz 1b\n\t"
#define A(i) "vpaddd %%zmm" #i ", %%zmm8, %%zmm8\n\t"
            A(9) A(10) A(11) A(12) A(13) A(14) A(15) A(16) A(17) A(18) A(19)
            A(20) A(21) A(22) A(23) A(24) A(25) A(26) A(27) A(28) A(29) A(30) A(31)
#undef A
            "vmovdqa32 %%zmm8, %[out]\n\t"
            : [n] "+r"(n), [out] "=m"(sums)
            : [one] "r"(0x01010101), [two] "r"(0x01FF01FF)
            : "xmm0", "xmm1", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16",
              "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27",
              "xmm28", "xmm29", "xmm30", "xmm31", "cc");
        for (int i = 0; i < 16; i++) total += sums[i];
    }
    return total;
}

/* MACs one vnni_peak call does per thread per iteration: 24 instructions x 16 lanes x 4 byte products */
int64_t vnni_peak_macs_per_iter(void) { return 24 * 16 * 4; }
