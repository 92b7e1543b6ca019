/* Which path a decode-step sparse GEMV takes: the input-sparse kernel, or the
 * dense kernel on the masked input. Both give the same bits, so the choice is
 * only about time, and it is measured rather than assumed: where the sparse
 * kernel pays depends on the matrix shape and on where the weights sit (a
 * model that fits the last-level cache makes the dense kernel relatively
 * faster than one streamed from memory), which a fixed crossover cannot know.
 *
 * Per unit (a lone sparse MatMulNBits, or a group of stacked siblings): both
 * paths are timed a few times, then each call takes the one predicted faster
 * (sparse time taken as proportional to the active channels), and one call in
 * EA_TUNE_REFRESH runs the other path so a change of machine state is seen (one
 * in EA_TUNE_REFRESH_CLEAR where the other path is predicted EA_TUNE_CLEAR x slower). */
#ifndef EDGEACT_SPARSE_TUNE_H
#define EDGEACT_SPARSE_TUNE_H

#include <stdint.h>

#define EA_TUNE_SAMPLES 3   /* samples per path before predicting (the first one is warm-up, the
                             * estimate starts at the lower of the other two) */
#define EA_TUNE_REFRESH 64  /* one call in this many takes the path not predicted */
#define EA_TUNE_CLEAR 1.5   /* ... or in EA_TUNE_REFRESH_CLEAR when it is predicted this much slower: */
#define EA_TUNE_REFRESH_CLEAR 256 /* a re-check costs the gap between the paths (gate/up dense at
                             * TinyLlama 70% is 4x sparse: 2% of every token at one in 64) */

typedef struct ea_sparse_tune {
    double dense_ns;     /* estimate of one dense run of the unit */
    double sparse_ns_ch; /* estimate of one sparse run, per active channel */
    uint32_t n_dense, n_sparse; /* samples seen per path */
    uint32_t calls;      /* decisions made after the exploration */
} ea_sparse_tune;

/* 1: run the sparse kernel for a call with n_active active channels, 0: dense. */
int ea_tune_pick(ea_sparse_tune *t, int n_active);
/* Folds the wall time of one run on the given path into the estimates. */
void ea_tune_record(ea_sparse_tune *t, int sparse, int n_active, uint64_t ns);

#endif
