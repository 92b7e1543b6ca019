/* Which path a decode-step sparse GEMV takes: the input-sparse kernel, or the
 * dense kernel on the masked input. Both give the same bits, so the choice is
 * only about time, and it is measured rather than assumed: where the sparse
 * kernel pays depends on the matrix shape, on the CPU and on where the weights
 * sit (a model that fits the last-level cache makes the dense kernel relatively
 * faster than one streamed from memory), which a fixed crossover cannot know
 * (docs/performance.md, "why the choice is measured").
 *
 * Per unit (a lone sparse MatMulNBits, or a group of stacked siblings): both
 * paths are timed a few times, then each call takes the one predicted faster
 * (sparse time taken as proportional to the active channels), and now and then
 * a call runs the other path so a change is seen: EA_TUNE_FIRST_RECHECK calls
 * after the exploration, then at doubling intervals up to one call in
 * EA_TUNE_REFRESH (EA_TUNE_REFRESH_CLEAR where the other path is predicted
 * EA_TUNE_CLEAR x slower). The exploration runs on the first decode steps after
 * a prompt, the noisiest; a start that was wrong by more than the clear margin
 * waited 256 calls for its first re-check.
 *
 * The prediction is the ratio of the two paths' costs, not their absolute
 * times: a shared VM slows both paths alike for seconds at a time, the path in
 * use is timed on every call and the other only on re-checks, and absolute
 * estimates set a slowed path in use against the other's stale calm figure and
 * flipped (test_sparse_tune: a 2x slowdown of both paths). A re-check's time is
 * set against the path in use's latest call (at most 1.5x its estimate), which
 * saw the same machine state. */
#ifndef EDGEACT_SPARSE_TUNE_H
#define EDGEACT_SPARSE_TUNE_H

#include <stdint.h>

#define EA_TUNE_SAMPLES 3   /* samples per path before predicting (the first one is warm-up, the
                             * estimate starts at the lower of the other two) */
#define EA_TUNE_REFRESH 32  /* one call in this many takes the path not predicted */
#define EA_TUNE_CLEAR 1.5   /* ... or in EA_TUNE_REFRESH_CLEAR when it is predicted this much slower: */
#define EA_TUNE_REFRESH_CLEAR 256 /* a re-check costs the gap between the paths, which at high
                             * sparsity is several times the sparse path (docs/performance.md,
                             * "re-check interval") */
#define EA_TUNE_FIRST_RECHECK 4
#define EA_TUNE_RECHECK_WEIGHT 0.5 /* a re-check's share in the ratio: re-checks are rare, and a
                             * slow outlier among them only argues for the path in use */

typedef struct ea_sparse_tune {
    double dense_ns;     /* estimate of one dense run of the unit (the machine's current state) */
    double sparse_ns_ch; /* estimate of one sparse run, per active channel */
    double last_dense, last_sparse_ch; /* each path's latest sample (capped as the estimate takes it) */
    double log_ratio;    /* log(sparse per channel / dense): what the choice follows */
    uint32_t n_dense, n_sparse; /* samples seen per path */
    uint32_t calls;      /* decisions made after the exploration */
    uint32_t interval, next_check; /* re-check schedule (calls) */
    int recheck;         /* the last pick ran the path not predicted */
} ea_sparse_tune;

/* 1: run the sparse kernel for a call with n_active active channels, 0: dense. */
int ea_tune_pick(ea_sparse_tune *t, int n_active);
/* Folds the wall time of one run on the given path into the estimates. */
void ea_tune_record(ea_sparse_tune *t, int sparse, int n_active, uint64_t ns);

#endif
