/* A barrier-free pool of helper threads for graphopt's C kernels, instead of OpenMP (issue 18), started on first
 * use: one a process, shared by every library that includes this header (go_pool_share).
 *
 * pool_run(threads, chunks, fn, fini, arg) runs fn(arg, c, &scratch) for every chunk c in [0, chunks). The
 * caller posts the job and works on it itself; helpers that are awake claim chunks too, one at a time, so a
 * thread slowed by another process takes fewer of them. The caller claims from the front and helpers from the
 * back: consecutive kernels give each thread mostly the same rows, still in its own cache (MiniLM b8 -5 %,
 * DeiT-S b8 -1 %, against one shared counter). The caller then waits only for chunks
 * already claimed, never for a helper to arrive: when another process holds a core and a helper is not
 * running, the caller does its share instead of waiting a time slice for it (OpenMP's barrier would).
 * Helpers spin briefly for the next job (kernels come in runs), then sleep on a futex. One job at a time: a
 * caller that finds the pool busy (kernels called from several threads of its own) runs its job alone.
 * scratch starts NULL in each thread that takes part; fn may set it (per-thread buffers, AMX tile state) and
 * fini(scratch) runs once that thread has no chunk left. fini must not read arg: the caller may have returned.
 * Which thread runs a chunk never changes what the chunk computes, so results do not depend on it.
 */
#ifndef GO_POOL_H
#define GO_POOL_H

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef void (*pool_fn)(const void *arg, int64_t chunk, void **scratch);
typedef void (*pool_fini)(void *scratch);

typedef struct {
    pool_fn fn;
    pool_fini fini;                          /* NULL: nothing to release */
    const void *arg;
    int64_t chunks;
    int helpers;                             /* helpers 0 .. helpers - 1 may take part */
} pool_job_t;

#define POOL_MAX_HELPERS 63
#define POOL_SPIN_PAUSES 20000              /* ~0.1-1 ms of pause before a helper sleeps */

typedef struct {
    pthread_mutex_t busy;
    _Atomic uint64_t claim;                 /* job number, head, tail: see pool_work_on */
    _Atomic int64_t done;                   /* chunks finished */
    _Atomic uint32_t posted;                /* jobs posted (the helpers' futex word) */
    _Atomic int sleepers;
    int started;
    pool_job_t job;
} pool_state_t;

/* The pool this library's kernels use: its own until go_pool_share points it at another library's (c_build.py does,
 * at load, so all of a process's kernel libraries share one set of helpers: a library's helpers spinning for their
 * next job took a core from another library's threads: DeiT-S b8 + token merging, three libraries). */
static pool_state_t pool_own = {.busy = PTHREAD_MUTEX_INITIALIZER};
static pool_state_t *pool = &pool_own;

#define POOL_ABI 1                          /* pool_state_t's layout: libraries share a pool only at the same one */
int go_pool_abi(void) { return POOL_ABI; }
void *go_pool_state(void) { return pool; }
void go_pool_share(void *state) { pool = state; }     /* before this library runs a job */

/* claim: job number (16 bits) | head (24) | tail (24): chunks [head, tail) are unclaimed; the split point
 * between the caller's front and the helpers' back moves with their speed. */
#define CLAIM_JOB(s) ((uint32_t)((s) >> 48))
#define CLAIM_HEAD(s) ((int64_t)(((s) >> 24) & 0xFFFFFF))
#define CLAIM_TAIL(s) ((int64_t)((s) & 0xFFFFFF))

/* Claims and runs chunks of job number `number` (its low 16 bits), from the front or the back, until none is
 * left. */
static void pool_work_on(uint32_t number, int front) {
    void *scratch = NULL;
    pool_fini fini = NULL;
    uint64_t s = atomic_load_explicit(&pool->claim, memory_order_acquire);
    while (CLAIM_JOB(s) == (number & 0xFFFF) && CLAIM_HEAD(s) < CLAIM_TAIL(s)) {
        uint64_t next = front ? s + ((uint64_t)1 << 24) : s - 1;
        if (!atomic_compare_exchange_weak_explicit(&pool->claim, &s, next, memory_order_acquire,
                                                   memory_order_acquire))
            continue;
        const pool_job_t *j = &pool->job;     /* stays valid: the caller waits for this chunk */
        fini = j->fini;
        j->fn(j->arg, front ? CLAIM_HEAD(s) : CLAIM_TAIL(s) - 1, &scratch);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
        s = atomic_load_explicit(&pool->claim, memory_order_acquire);
    }
    if (scratch && fini) fini(scratch);
}

static void *pool_helper_main(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool->posted);
    for (;;) {
        uint32_t now;
        for (int spin = 0; (now = atomic_load_explicit(&pool->posted, memory_order_acquire)) == seen; spin++) {
            if (spin < POOL_SPIN_PAUSES) {
                _mm_pause();
                if (spin % 256 == 255) sched_yield();      /* gives way to a thread that has work */
                continue;
            }
            atomic_fetch_add(&pool->sleepers, 1);
            syscall(SYS_futex, &pool->posted, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&pool->sleepers, 1);
            spin = 0;
        }
        seen = now;
        if (id < pool->job.helpers) pool_work_on(now, 0);
    }
    return NULL;
}

static int pool_start(int helpers) {          /* under pool->busy */
    for (; pool->started < helpers; pool->started++) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int fail = pthread_create(&t, &at, pool_helper_main, (void *)(intptr_t)pool->started);
        pthread_attr_destroy(&at);
        if (fail) break;
    }
    return pool->started < helpers ? pool->started : helpers;
}

/* fn(arg, c, &scratch) for c in [0, chunks) on up to `threads` threads (the caller one of them). */
static void pool_run(int threads, int64_t chunks, pool_fn fn, pool_fini fini, const void *arg) {
    int helpers = threads - 1 < POOL_MAX_HELPERS ? threads - 1 : POOL_MAX_HELPERS;
    if (helpers < 1 || chunks < 2 || chunks >= (1 << 24) || pthread_mutex_trylock(&pool->busy)) {
        void *scratch = NULL;
        for (int64_t c = 0; c < chunks; c++) fn(arg, c, &scratch);
        if (scratch && fini) fini(scratch);
        return;
    }
    pool_job_t j = {fn, fini, arg, chunks, pool_start(helpers)};
    pool->job = j;
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    uint32_t number = atomic_load_explicit(&pool->posted, memory_order_relaxed) + 1;
    atomic_store_explicit(&pool->claim, (uint64_t)(number & 0xFFFF) << 48 | (uint64_t)chunks, memory_order_release);
    atomic_store_explicit(&pool->posted, number, memory_order_release);
    if (atomic_load(&pool->sleepers)) syscall(SYS_futex, &pool->posted, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    pool_work_on(number, 1);
    for (int spin = 0; atomic_load_explicit(&pool->done, memory_order_acquire) < chunks; spin++) {
        if (spin < 64) _mm_pause();         /* a helper finishing its chunk */
        else sched_yield();                 /* it may be waiting for this core */
    }
    pthread_mutex_unlock(&pool->busy);
}

/* How many chunks to cut `items` into: ~32 a thread, each at least `min_items` long. Slack for a thread slowed by
 * another process, and a short wait at the end: the last chunk claimed is what the other thread may wait for
 * (DeiT-S b8, 2 threads: 1.3 % faster than ~8 a thread over four interleaved A/B runs). */
static inline int64_t pool_chunk(int64_t items, int threads, int64_t min_items) {
    int64_t c = items / (32 * (int64_t)(threads < 1 ? 1 : threads));
    c = c < min_items ? min_items : c;
    return c < 1 ? 1 : c;
}

#endif
