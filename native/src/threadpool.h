/* Persistent worker pool. Workers are started once by ea_pool_create; a
 * dispatch (ea_pool_run) only wakes them, because a decode step issues ~200
 * dispatches per token and cannot afford thread creation. Workers spin a
 * short while after each job before sleeping on a condition variable. */
#ifndef EDGEACT_THREADPOOL_H
#define EDGEACT_THREADPOOL_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ea_pool ea_pool;

/* One unit of work: `task` in [0, n_tasks), `thread` in [0, ea_pool_size)
 * (the caller is thread 0), usable to index per-thread scratch. */
typedef void (*ea_task_fn)(void *ctx, int task, int thread);

/* n_threads counts the caller; n_threads <= 0 means one per physical core.
 * Returns NULL when threads cannot be started. */
ea_pool *ea_pool_create(int n_threads);
void ea_pool_destroy(ea_pool *pool);

/* Number of threads that run tasks (>= 1); 1 for a NULL pool. */
int ea_pool_size(const ea_pool *pool);

/* Runs fn(ctx, t, thread) for every t in [0, n_tasks) and returns when all
 * are done. A NULL pool runs the tasks on the caller. Not reentrant: a task
 * must not call ea_pool_run on the same pool. */
void ea_pool_run(ea_pool *pool, ea_task_fn fn, void *ctx, int n_tasks);

#ifdef __cplusplus
}
#endif
#endif
