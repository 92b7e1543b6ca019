/* Kernel benchmark (not a test): int4 block-32 MatMulNBits GEMV streaming
 * weights from DRAM. It cycles through enough distinct weight matrices to
 * exceed the last-level cache and reports us per call and weight GB/s
 * (packed data + scales, the bytes the kernel must read) for each ISA and
 * thread count, next to a plain read-bandwidth probe of the machine.
 *
 *   bench_kernels [seconds_per_case]      (default 0.5) */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../src/kernels/kernels.h"
#include "../src/threadpool.h"

#define CACHE_BYTES (256u << 20) /* well above the 32 MiB L3 */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint32_t rng = 12345;
static uint32_t rnd(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }

/* Read bandwidth: sum a large buffer split over the pool's threads. */
typedef struct { const uint64_t *buf; size_t n; int tasks; uint64_t out[64]; } read_job;
static void read_task(void *arg, int t, int thread) {
    (void)thread;
    read_job *j = arg;
    size_t a = j->n * t / j->tasks, b = j->n * (t + 1) / j->tasks;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = a; i + 4 <= b; i += 4) { s0 += j->buf[i]; s1 += j->buf[i + 1]; s2 += j->buf[i + 2]; s3 += j->buf[i + 3]; }
    j->out[t] = s0 + s1 + s2 + s3;
}

static double read_bandwidth(ea_pool *pool) {
    const size_t bytes = 512u << 20, n = bytes / 8;
    uint64_t *buf = malloc(bytes);
    for (size_t i = 0; i < n; i++) buf[i] = i;
    read_job j = {buf, n, ea_pool_size(pool), {0}};
    ea_pool_run(pool, read_task, &j, j.tasks);
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        ea_pool_run(pool, read_task, &j, j.tasks);
        double gbs = bytes / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    free(buf);
    return best;
}

static void bench_gemv(int K, int N, double seconds, ea_pool *pools[3]) {
    const int bs = 32, nb = (K + bs - 1) / bs;
    const size_t dbytes = (size_t)N * nb * bs / 2, sbytes = sizeof(float) * (size_t)N * nb;
    const double wbytes = (double)(dbytes + sbytes);
    int copies = (int)(CACHE_BYTES / wbytes) + 1;
    if (copies < 2) copies = 2;
    uint8_t *data = malloc(dbytes);
    float *scales = malloc(sbytes);
    for (size_t i = 0; i < dbytes; i++) data[i] = (uint8_t)rnd();
    for (size_t i = 0; i < (size_t)N * nb; i++) scales[i] = (rnd() & 0xffff) * 1e-6f;
    float *x = malloc(sizeof(float) * K), *y = malloc(sizeof(float) * N);
    for (int i = 0; i < K; i++) x[i] = (float)(rnd() & 0xffff) / 65536.0f - 0.5f;
    const ea_isa isas[] = {EA_ISA_SCALAR, EA_ISA_AVX2, EA_ISA_NEON, EA_ISA_NEON_DOTPROD};
    for (size_t i = 0; i < sizeof isas / sizeof isas[0]; i++) {
        if (!ea_isa_available(isas[i])) continue;
        ea_qweight *w = calloc((size_t)copies, sizeof *w);
        for (int c = 0; c < copies; c++) ea_qweight_init(&w[c], isas[i], K, N, 4, bs, data, scales, NULL);
        for (int p = 0; p < 2; p++) {
            ea_kctx ctx;
            ea_kctx_init(&ctx, isas[i], pools[p]);
            const double budget = isas[i] == EA_ISA_SCALAR ? seconds / 4 : seconds;
            ea_qmatmul(&ctx, &w[0], x, 1, y); /* warm-up */
            int calls = 0;
            double t0 = now(), t;
            do {
                ea_qmatmul(&ctx, &w[calls % copies], x, 1, y);
                calls++;
            } while ((t = now() - t0) < budget || calls < copies);
            /* the scalar path reads the file layout (no repack): same bytes */
            printf("gemv int4 b32 K=%5d N=%5d %-12s threads=%d  %9.1f us/call  %6.2f GB/s  (%d matrices, %d calls)\n",
                   K, N, ea_isa_name(isas[i]), ea_pool_size(pools[p]), t / calls * 1e6, wbytes * calls / t / 1e9,
                   copies, calls);
            ea_kctx_release(&ctx);
        }
        for (int c = 0; c < copies; c++) ea_qweight_release(&w[c]);
        free(w);
    }
    free(data); free(scales); free(x); free(y);
}

int main(int argc, char **argv) {
    const double seconds = argc > 1 ? atof(argv[1]) : 0.5;
    ea_pool *pools[3] = {NULL, ea_pool_create(2), NULL};
    printf("read bandwidth: %.2f GB/s (1 thread), %.2f GB/s (2 threads)\n", read_bandwidth(NULL),
           read_bandwidth(pools[1]));
    bench_gemv(4096, 4096, seconds, pools);
    bench_gemv(4096, 11008, seconds, pools);
    ea_pool_destroy(pools[1]);
    return 0;
}
