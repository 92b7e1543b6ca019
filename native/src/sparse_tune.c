/* The measured crossover between the sparse and the dense decode GEMV (sparse_tune.h). */
#include "sparse_tune.h"

int ea_tune_pick(ea_sparse_tune *t, int n_active) {
    if (t->n_sparse < EA_TUNE_SAMPLES || t->n_dense < EA_TUNE_SAMPLES)
        return t->n_sparse <= t->n_dense; /* explore: alternate, sparse first */
    const double sparse = t->sparse_ns_ch * (n_active > 1 ? (double)n_active : 1.0), dense = t->dense_ns;
    const int pred = sparse < dense;
    const int clear = pred ? dense >= EA_TUNE_CLEAR * sparse : sparse >= EA_TUNE_CLEAR * dense;
    return ++t->calls % (clear ? EA_TUNE_REFRESH_CLEAR : EA_TUNE_REFRESH) == 0 ? !pred : pred;
}

/* The first sample of a path is warm-up (scratch growth, cold code); the estimate starts at
 * the lower of the next two (one preempted sample cannot set it), then a moving average
 * follows the machine. A sample above 1.5x the estimate counts as 1.5x: the path in use is
 * sampled on every call and the other one only on re-checks, so one slow call (a preempted
 * thread, the first decode step after a long prompt) must not flip the choice for 64 calls,
 * as it did with a 4x cap (TinyLlama teal 0.5 after pp128: gate/up sparse on 32% of calls);
 * a real slowdown still moves it 10% per call. The floor of 1 ns keeps a zero from sticking. */
static void fold(double *est, uint32_t *n, double x) {
    const uint32_t k = (*n)++;
    if (k == 0) return;
    if (x < 1.0) x = 1.0;
    if (k == 1) { *est = x; return; }
    if (k == 2) { *est = x < *est ? x : *est; return; }
    if (x > 1.5 * *est) x = 1.5 * *est;
    const double a = k < EA_TUNE_SAMPLES + 2 ? 1.0 / k : 0.2;
    *est += a * (x - *est);
}

void ea_tune_record(ea_sparse_tune *t, int sparse, int n_active, uint64_t ns) {
    /* a call with no active channel costs only the fixed part: it says nothing per channel */
    if (sparse && n_active > 0) fold(&t->sparse_ns_ch, &t->n_sparse, (double)ns / n_active);
    else if (!sparse) fold(&t->dense_ns, &t->n_dense, (double)ns);
}
