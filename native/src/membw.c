/* Memory read bandwidth probe for `edgeact bench`: the yardstick that decode
 * speed is reported against (weight bytes per second ÷ this).  The buffer must
 * dwarf the last-level cache (VMs report up to a few hundred MiB of L3), so the
 * caller passes its size; best of `reps` passes, as the machine's capability. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/internal.h" /* EA_QPREFETCH: the probe streams like the kernels */
#include "../include/edgeact_tools.h"
#include "platform.h" /* threads 0 means one per physical core, as for sessions */
#include "threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EA_MEMBW_X86 1
#endif

typedef struct { const uint64_t *buf; size_t n; int tasks; uint64_t out[256]; } read_job;

#ifdef EA_MEMBW_X86
/* 256-bit loads, four accumulators: the loop is bound by memory, not by issue.
 * Software prefetch 4 KB ahead, as the kernels do: without it two cores keep
 * too few lines in flight and the probe read 22-26 GB/s on a machine where
 * prefetched streams (and the int4 GEMV) reach 30 and more. */
__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(p + i) + EA_QPREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(p + i) + EA_QPREFETCH + 64, _MM_HINT_T0);
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(p + i + 12)));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
    uint64_t s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (; i < n; i++) s += p[i];
    return s;
}
#endif

static uint64_t sum_plain(const uint64_t *p, size_t n) {
    /* Four independent sums keep several loads in flight (NEON: the compiler vectorizes this). */
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        if ((i & 7) == 0) __builtin_prefetch((const char *)(p + i) + EA_QPREFETCH, 0, 3);
        s0 += p[i]; s1 += p[i + 1]; s2 += p[i + 2]; s3 += p[i + 3];
    }
    for (; i < n; i++) s0 += p[i];
    return s0 + s1 + s2 + s3;
}

static void read_task(void *arg, int t, int thread) {
    (void)thread;
    read_job *j = arg;
    size_t a = j->n * (size_t)t / (size_t)j->tasks, b = j->n * (size_t)(t + 1) / (size_t)j->tasks;
#ifdef EA_MEMBW_X86
    if (__builtin_cpu_supports("avx2")) { j->out[t & 255] = sum_avx2(j->buf + a, b - a); return; }
#endif
    j->out[t & 255] = sum_plain(j->buf + a, b - a);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Best of `reps` runs of `tasks` tasks (on a pool of that many threads, or inline for one):
 * GB/s of `bytes` each run reads. Both probes time themselves this way. */
static double best_gbs(void (*task)(void *, int, int), void *job, int tasks, double bytes, int reps) {
    ea_pool *pool = tasks > 1 ? ea_pool_create(tasks) : NULL;
    if (tasks > 1 && !pool) return -2.0;
    double best = 0.0;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        if (pool) ea_pool_run(pool, task, job, tasks);
        else task(job, 0, 0);
        double gbs = bytes / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    if (pool) ea_pool_destroy(pool);
    return best;
}

/* GB/s read with `threads` threads (0: one per core) over `bytes` bytes; < 0 on bad arguments
 * or no memory. */
double ea_measure_read_bandwidth(int threads, size_t bytes, int reps) {
    if (threads == 0) threads = ea_platform()->physical_cores;
    if (threads < 1 || threads > 256 || bytes < (1u << 20) || reps < 1) return -1.0;
    size_t n = bytes / 8;
    uint64_t *buf = malloc(n * 8);
    if (!buf) return -2.0;
    for (size_t i = 0; i < n; i++) buf[i] = i;  /* touch every page before timing */
    read_job j;
    memset(&j, 0, sizeof j);
    j.buf = buf; j.n = n; j.tasks = threads;
    const double best = best_gbs(read_task, &j, threads, (double)(n * 8), reps);
    free(buf);
    return best;
}

/* ---- scattered rows: what the input-sparse GEMV asks of memory -------------
 * A random share of fixed-size rows, read whole in ascending order, each thread
 * its share of the list, the rows prefetched ~4 KB of reads ahead (the best of
 * the patterns tried for this: the kernel's own interleaved tile order and
 * deeper prefetch were no faster). A run of 1 KB is over before the hardware
 * prefetchers pick it up, so this is the core's own misses in flight: the bound
 * on what input sparsity can save (docs/performance.md, "random rows"). */
typedef struct {
    const uint8_t *buf;
    const uint32_t *rows;
    size_t n_rows, row_bytes, ahead;
    int tasks;
    uint64_t out[256];
} rows_job;

static void rows_task(void *arg, int t, int thread) {
    (void)thread;
    rows_job *j = arg;
    const size_t a = j->n_rows * (size_t)t / (size_t)j->tasks, b = j->n_rows * (size_t)(t + 1) / (size_t)j->tasks;
    const size_t words = j->row_bytes / 8;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = a; i < b; i++) {
        if (i + j->ahead < b) {
            const uint8_t *p = j->buf + (size_t)j->rows[i + j->ahead] * j->row_bytes;
            for (size_t o = 0; o < j->row_bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
        }
        /* not sum_plain: its stream prefetch runs past the row into rows not in the list */
        const uint64_t *r = (const uint64_t *)(j->buf + (size_t)j->rows[i] * j->row_bytes);
        for (size_t w = 0; w < words; w += 4) { /* row_bytes is a multiple of 64 */
            s0 += r[w]; s1 += r[w + 1]; s2 += r[w + 2]; s3 += r[w + 3];
        }
    }
    j->out[t & 255] = s0 + s1 + s2 + s3;
}

/* GB/s of the active rows' bytes; < 0 on bad arguments or no memory. */
double ea_measure_rows_read_bandwidth(int threads, size_t bytes, size_t row_bytes, double active, int reps) {
    if (threads == 0) threads = ea_platform()->physical_cores;
    if (threads < 1 || threads > 256 || bytes < (1u << 20) || reps < 1 || row_bytes < 64 || row_bytes % 64 ||
        row_bytes > bytes / 16 || !(active > 0.0 && active <= 1.0) || bytes / row_bytes > UINT32_MAX)
        return -1.0;
    const size_t n = bytes / row_bytes;
    uint8_t *buf = ea_alloc_weights(n * row_bytes); /* huge pages, as the weight repacks */
    uint32_t *rows = malloc(sizeof *rows * n);
    if (!buf || !rows) {
        free(buf);
        free(rows);
        return -2.0;
    }
    size_t n_act = 0;
    uint32_t rng = 12345;
    for (size_t i = 0; i < n; i++) {
        rng = rng * 1664525u + 1013904223u;
        if ((rng >> 8) < active * (double)(1u << 24)) rows[n_act++] = (uint32_t)i;
    }
    if (!n_act) rows[n_act++] = 0;
    rows_job j;
    memset(&j, 0, sizeof j);
    j.buf = buf; j.rows = rows; j.n_rows = n_act; j.row_bytes = row_bytes; j.tasks = threads;
    j.ahead = row_bytes >= 4096 ? 1 : 4096 / row_bytes;
    const double best = best_gbs(rows_task, &j, threads, (double)(n_act * row_bytes), reps);
    free(buf);
    free(rows);
    return best;
}
