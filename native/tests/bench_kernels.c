/* Kernel benchmark (not a test): int4 block-32 MatMulNBits GEMV streaming
 * weights from DRAM. It cycles through enough distinct weight matrices to
 * exceed the last-level cache and reports us per call and weight GB/s
 * (packed data + scales, the bytes the kernel must read) for each ISA and
 * thread count, next to the read-bandwidth probe `edgeact bench` uses.
 * Then the activation-sparse kernels against the dense GEMV on FFN shapes:
 * us per call, dense-equivalent GB/s (dense weight bytes / time) and the
 * speed-up over the dense kernel, over a sweep of active fractions (the
 * crossover behind EA_SPARSE_DENSE_CROSSOVER).
 *
 *   bench_kernels [seconds_per_case] [sparse|gemv|all] [block]
 *   (defaults 0.5 all 32; "sparse" skips the dense GEMV part, "gemv" the sparse part; block
 *   applies to the sparse part)
 *   BENCH_SHAPE=K,N   the sparse part on that one shape instead of the FFN shapes
 *   BENCH_HOT=1       one matrix instead of enough to exceed the cache: compute, not memory
 *   BENCH_SYM=1       no zero points (the converters write them by default)
 *   BENCH_MIN=1       the sparse part with fp16 float minimums instead of zero points
 *   BENCH_GEMV=LIST   the dense GEMV's weight kinds, comma-separated (default sym): sym (no zero
 *                     points), zp (integer zero points), min (fp16 float minimums, as Q4_1
 *                     sources give), min32 (fp32 minimums)
 *   BENCH_CONTIG=1    the active channels are the first ones, not a random set: the channel-major
 *                     layout's best case (one run of rows), against the scattered rows of decode */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../include/edgeact.h"
#include "../include/edgeact_tools.h"
#include "../src/kernels/kernels.h"
#include "../src/threadpool.h"

/* Well above the last-level cache, including VMs that report the host's whole L3
 * (260 MiB seen): cycle through 768 MiB. */
#define CACHE_BYTES (768u << 20)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint32_t rng = 12345;
static uint32_t rnd(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }

/* kind: 0 symmetric, 1 integer zero points, 2 fp16 minimums, 3 fp32 minimums */
static const char *const gemv_kinds[4] = {"sym", "zp", "min", "min32"};

static void bench_gemv(int K, int N, double seconds, ea_pool *pools[3], int kind) {
    const int bs = 32, nb = (K + bs - 1) / bs;
    const size_t dbytes = (size_t)N * nb * bs / 2, sbytes = sizeof(float) * (size_t)N * nb;
    const size_t zbytes = (size_t)N * ((nb + 1) / 2);
    const double wbytes = (double)(dbytes + sbytes + (kind == 1 ? zbytes : kind >= 2 ? sbytes : 0));
    int copies = (int)(CACHE_BYTES / wbytes) + 1;
    if (copies < 2) copies = 2;
    if (getenv("BENCH_HOT")) copies = 1;
    uint8_t *data = malloc(dbytes);
    float *scales = malloc(sbytes);
    for (size_t i = 0; i < dbytes; i++) data[i] = (uint8_t)rnd();
    for (size_t i = 0; i < (size_t)N * nb; i++) scales[i] = ea_f16_to_f32(ea_f32_to_f16((rnd() & 0xffff) * 1e-6f)); /* as converters write */
    uint8_t *zp = kind == 1 ? malloc(zbytes) : NULL;
    for (size_t i = 0; zp && i < zbytes; i++) zp[i] = (uint8_t)(0x77 + (rnd() % 3) * 0x11);
    float *mins = kind >= 2 ? malloc(sbytes) : NULL;
    for (size_t i = 0; mins && i < (size_t)N * nb; i++) {
        mins[i] = -(float)(rnd() % 16) * scales[i];
        if (kind == 3) mins[i] *= 1.0f + 1e-6f; /* off the fp16 grid */
    }
    float *x = malloc(sizeof(float) * K), *y = malloc(sizeof(float) * N);
    for (int i = 0; i < K; i++) x[i] = (float)(rnd() & 0xffff) / 65536.0f - 0.5f;
    ea_isa isas[8];
    const int n_isas = ea_isa_list(isas, 8);
    for (int i = 0; i < n_isas; i++) {
        if (!ea_isa_available(isas[i])) continue;
        ea_qweight *w = calloc((size_t)copies, sizeof *w);
        for (int c = 0; c < copies; c++) {
            const int rc = mins ? ea_qweight_init_min(&w[c], isas[i], K, N, 4, bs, data, scales, mins)
                                : ea_qweight_init(&w[c], isas[i], K, N, 4, bs, data, scales, zp);
            if (rc) {
                fprintf(stderr, "cannot prepare the weight: %s\n", ea_kernels_strerror(rc));
                exit(1);
            }
        }
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
            /* the bytes the kernel reads: the scalar path the file layout, SIMD the repack */
            const double rbytes = w[0].packed ? (double)w[0].packed_bytes : wbytes;
            printf("gemv int4 b32 %-5s K=%5d N=%5d %-12s threads=%d  %9.1f us/call  %6.2f GB/s  (%d matrices, %d calls)\n",
                   gemv_kinds[kind], K, N, ea_isa_name(isas[i]), ea_pool_size(pools[p]), t / calls * 1e6,
                   rbytes * calls / t / 1e9, copies, calls);
            ea_kctx_release(&ctx);
        }
        for (int c = 0; c < copies; c++) ea_qweight_release(&w[c]);
        free(w);
    }
    free(data); free(scales); free(zp); free(mins); free(x); free(y);
}

static void empty_task(void *ctx, int task, int thread) { (void)ctx; (void)task; (void)thread; }

/* Round trip of one dispatch with trivial tasks (a decode step issues ~200). */
static double dispatch_us(ea_pool *pool) {
    const int rounds = 20000;
    for (int i = 0; i < 100; i++) ea_pool_run(pool, empty_task, NULL, ea_pool_size(pool));
    double t0 = now();
    for (int i = 0; i < rounds; i++) ea_pool_run(pool, empty_task, NULL, ea_pool_size(pool));
    return (now() - t0) / rounds * 1e6;
}

/* Times fn over `copies` weights for about `seconds`; returns us per call. */
typedef void (*bench_fn)(void *ctx, int copy);
static double time_calls(bench_fn fn, void *ctx, int copies, double seconds) {
    fn(ctx, 0);
    int calls = 0;
    double t0 = now(), t;
    do {
        fn(ctx, calls % copies);
        calls++;
    } while ((t = now() - t0) < seconds || calls < copies);
    return t / calls * 1e6;
}

typedef struct {
    ea_kctx *ctx;
    ea_qweight *w;
    ea_qweight_cm *cm;
    const float *x;
    const int32_t *idx;
    int n_idx;
    float *y;
} sparse_bench;

static void run_dense(void *p, int c) { sparse_bench *b = p; ea_qmatmul(b->ctx, &b->w[c], b->x, 1, b->y); }
static void run_sparse_in(void *p, int c) {
    sparse_bench *b = p;
    ea_sparse_qgemv(b->ctx, &b->cm[c], NULL, b->x, b->idx, b->n_idx, b->y);
}
static void run_rows(void *p, int c) { sparse_bench *b = p; ea_qgemv_rows(b->ctx, &b->w[c], b->x, b->idx, b->n_idx, b->y); }

static void bench_sparse(int K, int N, int bs, double seconds, ea_pool *pool, ea_isa isa) {
    const int nb = K / bs;
    const size_t dbytes = (size_t)N * nb * bs / 2, sbytes = sizeof(float) * (size_t)N * nb;
    const double wbytes = (double)(dbytes + sbytes);
    const int copies = getenv("BENCH_HOT") ? 1 : (int)((512u << 20) / wbytes) + 1;
    uint8_t *data = malloc(dbytes);
    float *scales = malloc(sbytes), *x = malloc(sizeof(float) * K), *y = malloc(sizeof(float) * N);
    for (size_t i = 0; i < dbytes; i++) data[i] = (uint8_t)rnd();
    for (size_t i = 0; i < (size_t)N * nb; i++) scales[i] = ea_f16_to_f32(ea_f32_to_f16((rnd() & 0xffff) * 1e-6f)); /* as converters write */
    for (int i = 0; i < K; i++) x[i] = (float)(rnd() & 0xffff) / 65536.0f - 0.5f;
    ea_qweight *w = calloc((size_t)copies, sizeof *w);
    ea_qweight_cm *cm = calloc((size_t)copies, sizeof *cm);
    /* asymmetric, as the converters write int4 by default */
    const size_t zbytes = (size_t)N * ((nb + 1) / 2);
    float *mins = getenv("BENCH_MIN") ? malloc(sbytes) : NULL; /* as a Q4_1 source's blocks give */
    for (size_t i = 0; mins && i < (size_t)N * nb; i++) mins[i] = ea_f16_to_f32(ea_f32_to_f16(-(float)(rnd() & 0xffff) * 8e-6f));
    uint8_t *zp = getenv("BENCH_SYM") || mins ? NULL : malloc(zbytes);
    for (size_t i = 0; zp && i < zbytes; i++) zp[i] = (uint8_t)(0x77 + (rnd() % 3) * 0x11);
    /* the output-row kernel reads the file layout: a copy each, or it is read from the cache */
    uint8_t **cdata = malloc(sizeof *cdata * (size_t)copies);
    if (!cdata) exit(1);
    for (int c = 0; c < copies; c++) {
        cdata[c] = c ? malloc(dbytes) : data;
        if (!cdata[c]) {
            fprintf(stderr, "out of memory for %d copies of the weights\n", copies);
            exit(1);
        }
        if (c) memcpy(cdata[c], data, dbytes);
        int rc = mins ? ea_qweight_init_min(&w[c], isa, K, N, 4, bs, cdata[c], scales, mins)
                      : ea_qweight_init(&w[c], isa, K, N, 4, bs, cdata[c], scales, zp);
        if (!rc) rc = ea_qweight_cm_init(&cm[c], isa, &w[c]);
        if (rc) {
            fprintf(stderr, "cannot prepare the weight: %s\n", ea_kernels_strerror(rc));
            exit(1);
        }
    }
    ea_kctx ctx;
    ea_kctx_init(&ctx, isa, pool);
    int32_t *idx = malloc(sizeof(int32_t) * (K > N ? K : N));
    sparse_bench b = {&ctx, w, cm, x, idx, 0, y};
    const double dense_us = time_calls(run_dense, &b, copies, seconds);
    printf("sparse K=%d N=%d block %d %s threads=%d: dense %.1f us (%.2f GB/s of the file, %.2f of the repack)\n", K, N,
           bs, ea_isa_name(isa), ea_pool_size(pool), dense_us, wbytes / dense_us / 1e3,
           (double)w[0].packed_bytes / dense_us / 1e3);
    double fracs[16] = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8};
    size_t n_fracs = 8;
    int kinds = 2;
    if (getenv("BENCH_ACTIVE")) { /* e.g. "0.5,0.3": only these shares, input channels only */
        n_fracs = 0;
        for (const char *s = getenv("BENCH_ACTIVE"); *s && n_fracs < 16;) {
            char *e;
            fracs[n_fracs++] = strtod(s, &e);
            s = *e == ',' ? e + 1 : e + (*e != 0);
            if (e == s) break;
        }
        kinds = 1;
    }
    for (size_t f = 0; f < n_fracs; f++) {
        for (int kind = 0; kind < kinds; kind++) { /* 0: active input channels, 1: active output rows */
            const int lim = kind ? N : K;
            b.n_idx = 0;
            for (int i = 0; i < lim; i++)
                if (getenv("BENCH_CONTIG") ? i < fracs[f] * lim : (rnd() % 10000) < fracs[f] * 10000) idx[b.n_idx++] = i;
            const double us = time_calls(kind ? run_rows : run_sparse_in, &b, copies, seconds);
            printf("  %-13s active %3.0f%% (sparsity %3.0f%%): %8.1f us  %6.2f GB/s dense-equivalent  speed-up %.2fx\n",
                   kind ? "output rows" : "input chans", fracs[f] * 100, 100 - fracs[f] * 100, us,
                   wbytes / us / 1e3, dense_us / us);
        }
    }
    for (int c = 0; c < copies; c++) {
        ea_qweight_release(&w[c]);
        ea_qweight_cm_release(&cm[c]);
        if (c) free(cdata[c]);
    }
    free(cdata);
    ea_kctx_release(&ctx);
    free(w); free(cm); free(idx); free(data); free(scales); free(zp); free(mins); free(x); free(y);
}

int main(int argc, char **argv) {
    const double seconds = argc > 1 ? atof(argv[1]) : 0.5;
    ea_pool *pools[3] = {NULL, ea_pool_create(2), NULL};
    /* the probe `edgeact bench` reports decode against */
    printf("read bandwidth: %.2f GB/s (1 thread), %.2f GB/s (2 threads)\n", ea_measure_read_bandwidth(1, 512u << 20, 5),
           ea_measure_read_bandwidth(2, 512u << 20, 5));
    printf("pool dispatch (2 threads, back to back): %.2f us\n", dispatch_us(pools[1]));
    const int sparse_only = argc > 2 && strcmp(argv[2], "sparse") == 0;
    const int gemv_only = argc > 2 && strcmp(argv[2], "gemv") == 0;
    const int bs = argc > 3 ? atoi(argv[3]) : 32;
    if (bs != 32 && bs != 64 && bs != 128) {
        fprintf(stderr, "block size must be 32, 64 or 128\n");
        return 2;
    }
    if (!sparse_only) {
        const char *list = getenv("BENCH_GEMV") ? getenv("BENCH_GEMV") : "sym";
        for (int kind = 0; kind < 4; kind++) {
            const size_t len = strlen(gemv_kinds[kind]);
            int on = 0;
            for (const char *s = list; *s;) { /* exact items of the comma-separated list */
                const char *e = strchr(s, ',');
                const size_t n = e ? (size_t)(e - s) : strlen(s);
                on |= n == len && strncmp(s, gemv_kinds[kind], len) == 0;
                s += n + (e != NULL);
            }
            if (!on) continue;
            bench_gemv(4096, 4096, seconds, pools, kind);
            bench_gemv(4096, 11008, seconds, pools, kind);
        }
    }
    if (gemv_only) {
        ea_pool_destroy(pools[1]);
        return 0;
    }
    const ea_isa best = ea_isa_detect();
    int sk = 0, sn = 0;
    if (getenv("BENCH_SHAPE")) sscanf(getenv("BENCH_SHAPE"), "%d,%d", &sk, &sn);
    for (int p = getenv("BENCH_2T") ? 1 : 0; p < 2; p++) { /* BENCH_2T: the 2-thread pool only */
        if (sk) { bench_sparse(sk, sn, bs, seconds, pools[p], best); continue; }
        bench_sparse(2048, 5632, bs, seconds, pools[p], best); /* gate/up shape */
        bench_sparse(5632, 2048, bs, seconds, pools[p], best); /* down shape */
    }
    ea_pool_destroy(pools[1]);
    return 0;
}
