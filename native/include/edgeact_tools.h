/* edgeact native runtime: benchmark and probe entry points for tools (`edgeact bench`,
 * native/tests/bench_kernels.c), not part of the API in edgeact.h. Conventions as there.
 *
 * The lines between "cdef-begin" and "cdef-end" are read verbatim by the cffi build
 * (runtime/build_ffi.py): keep them free of preprocessor lines. */
#ifndef EDGEACT_TOOLS_H
#define EDGEACT_TOOLS_H

#include <stddef.h>
#include <stdint.h>

#include "edgeact.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
/* Kernel-level entry for benchmarks: a MatMulNBits weight (arrays as in
 * docs/model-folder.md, copied) run as y[M, N] = x[M, K] W^T with the
 * model-load ISA and n_threads (<= 0: physical cores). */
typedef struct ea_bench_qmatmul ea_bench_qmatmul;
int ea_bench_qmatmul_create(int K, int N, int bits, int block_size, const uint8_t *B, const float *scales,
                            const uint8_t *zero_points, int n_threads, ea_bench_qmatmul **out);
int ea_bench_qmatmul_run(ea_bench_qmatmul *bench, const float *x, int M, float *y);
/* Weight bytes one call reads (the SIMD repack, or the file layout on the scalar path). */
size_t ea_bench_qmatmul_bytes(const ea_bench_qmatmul *bench);
void ea_bench_qmatmul_free(ea_bench_qmatmul *bench);
/* Memory read bandwidth in GB/s over a buffer of `bytes` (best of reps), the yardstick for decode speed;
 * threads 0: one per physical core. Negative on bad arguments (-1) or no memory (-2). */
double ea_measure_read_bandwidth(int threads, size_t bytes, int reps);
/* The same over a random `active` share of `row_bytes`-byte rows (a multiple of 64), read whole
 * in ascending order: the input-sparse GEMV's reads, and the bound on what it saves. */
double ea_measure_rows_read_bandwidth(int threads, size_t bytes, size_t row_bytes, double active, int reps);
/* Tests of failure recovery: the session's next forward fails with EA_ERR_KERNEL at its executed
 * step `at` (counted from 1 over its chunks; ea_session_profile_count steps a chunk), before
 * running it; 0 disarms. One forward only, armed or not. */
int ea_session_inject_failure(ea_session *session, int at);
/* cdef-end */

#ifdef __cplusplus
}
#endif
#endif
