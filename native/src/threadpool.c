/* Persistent thread pool (see threadpool.h).
 *
 * `counter` holds generation << 32 | next task. A dispatch first moves to a
 * new generation marked CLOSED (no task can be claimed), writes the job,
 * then opens it with next = 0. Workers claim tasks with a CAS on the whole
 * counter, so a worker that wakes late can never run a task of one job with
 * the function or task count of another. */
#define _GNU_SOURCE
#include "threadpool.h"
#include "platform.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

/* ~50-100 us of polling before sleeping: long enough to bridge the gap
 * between two ops of a decode step, short enough not to burn a core idle. */
#define EA_POOL_SPIN 20000
#define CLOSED 0xffffffffu

struct ea_pool {
    int n_threads; /* including the caller */
    pthread_t *threads;
    _Atomic uint64_t counter; /* generation << 32 | next task */
    _Atomic(ea_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int n_tasks;
    _Atomic int done;
    _Atomic int sleepers;
    _Atomic int stop;
    pthread_mutex_t mu;
    pthread_cond_t wake;
};

typedef struct {
    ea_pool *pool;
    int index;
} worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Claims and runs tasks of generation gen until none is left. The job's
 * fields are read after an acquire load that shows gen open, and each claim
 * is a CAS on that very counter value: a claim can only succeed while the
 * job the fields describe is the current one. */
static void run_tasks(ea_pool *p, uint32_t gen, int thread) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&p->counter, memory_order_acquire);
        if ((uint32_t)(v >> 32) != gen) return;
        if ((uint32_t)v == CLOSED) { /* the caller is still writing this job */
            cpu_relax();
            continue;
        }
        ea_task_fn fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&p->ctx, memory_order_relaxed);
        const int n = atomic_load_explicit(&p->n_tasks, memory_order_relaxed);
        if ((int)(uint32_t)v >= n) return;
        if (!atomic_compare_exchange_weak_explicit(&p->counter, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        fn(ctx, (int)(uint32_t)v, thread);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    worker_arg a = *(worker_arg *)arg;
    free(arg);
    ea_pool *p = a.pool;
    uint32_t seen = (uint32_t)(atomic_load(&p->counter) >> 32);
    for (;;) {
        uint32_t gen = seen;
        for (int i = 0; i < EA_POOL_SPIN; i++) {
            gen = (uint32_t)(atomic_load_explicit(&p->counter, memory_order_acquire) >> 32);
            if (gen != seen || atomic_load_explicit(&p->stop, memory_order_relaxed)) break;
            cpu_relax();
        }
        if (gen == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while ((gen = (uint32_t)(atomic_load(&p->counter) >> 32)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = gen;
        run_tasks(p, gen, a.index);
    }
}

ea_pool *ea_pool_create(int n_threads) {
    if (n_threads <= 0) n_threads = ea_platform()->physical_cores;
    ea_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = n_threads;
    atomic_init(&p->counter, 0);
    atomic_init(&p->fn, NULL);
    atomic_init(&p->ctx, NULL);
    atomic_init(&p->n_tasks, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->stop, 0);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->threads = calloc((size_t)n_threads, sizeof *p->threads);
    if (!p->threads) goto fail;
    for (int i = 1; i < n_threads; i++) {
        worker_arg *a = malloc(sizeof *a);
        if (!a) goto fail_started;
        a->pool = p;
        a->index = i;
        if (pthread_create(&p->threads[i], NULL, worker_main, a) != 0) {
            free(a);
            goto fail_started;
        }
        continue;
    fail_started:
        p->n_threads = i; /* destroy joins only the workers that started */
        ea_pool_destroy(p);
        return NULL;
    }
    return p;
fail:
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
    free(p);
    return NULL;
}

void ea_pool_destroy(ea_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    free(pool->threads);
    free(pool);
}

int ea_pool_size(const ea_pool *pool) { return pool ? pool->n_threads : 1; }

void ea_pool_run(ea_pool *pool, ea_task_fn fn, void *ctx, int n_tasks) {
    if (n_tasks <= 0) return;
    if (!pool || pool->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    uint32_t gen = (uint32_t)(atomic_load(&pool->counter) >> 32) + 1;
    atomic_store(&pool->counter, (uint64_t)gen << 32 | CLOSED);
    atomic_store_explicit(&pool->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool->n_tasks, n_tasks, memory_order_relaxed);
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->counter, (uint64_t)gen << 32, memory_order_release); /* opens the job */
    if (atomic_load(&pool->sleepers) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mu);
    }
    run_tasks(pool, gen, 0);
    while (atomic_load_explicit(&pool->done, memory_order_acquire) < n_tasks) cpu_relax();
}
