/* Sparse path policy of the executor (matmul.c) and CoreInfer's kept rows (kept.c). */
#ifndef EDGEACT_SPARSE_H
#define EDGEACT_SPARSE_H

#include "../session.h"

struct ea_exec;

/* Resets the per-chunk state of stacked groups and prompt-row choices (before each chunk). */
void ea_sparse_chunk_begin(ea_session *ss);
/* Runs a MatMulNBits step on a sparse path when one applies (behind a Sparsify, CoreInfer
 * mask or CATS gate; stacked groups; low memory; measured prompt rows): returns 1 with the
 * kernel status in *rc, or 0 when the dense GEMM/GEMV is the path. a: the input rows. */
int ea_sparse_matmul(struct ea_exec *x, const float *a, int *rc);

#endif
