/* The measured crossover between the sparse and the dense decode GEMV (tune.h). */
#include "tune.h"

#include <math.h>

static int explored(const ea_sparse_tune *t) { return t->n_sparse >= EA_TUNE_SAMPLES && t->n_dense >= EA_TUNE_SAMPLES; }

int ea_tune_pick(ea_sparse_tune *t, int n_active) {
    t->recheck = 0;
    if (!explored(t)) return t->n_sparse <= t->n_dense; /* explore: alternate, sparse first */
    if (n_active < 1) return 1;                          /* nothing to read: the sparse path is free */
    const double margin = t->log_ratio + log((double)n_active); /* log(sparse / dense) */
    const int pred = margin < 0.0;
    const int clear = fabs(margin) >= log(EA_TUNE_CLEAR);
    const uint32_t cap = clear ? EA_TUNE_REFRESH_CLEAR : EA_TUNE_REFRESH;
    if (++t->calls >= t->next_check) {
        t->recheck = 1;
        t->interval = 2 * t->interval < cap ? 2 * t->interval : cap;
        t->next_check = t->calls + t->interval;
    } else if (t->next_check - t->calls > cap) { /* the margin shrank below clear */
        t->interval = cap;
        t->next_check = t->calls + cap;
    }
    return t->recheck ? !pred : pred;
}

/* The first sample of a path is warm-up (scratch growth, cold code); the estimate starts at
 * the lower of the next two (one preempted sample cannot set it), then a moving average
 * follows the machine. A sample above 1.5x the estimate counts as 1.5x: one slow call (a
 * preempted thread, the first decode step after a long prompt) moves it 10%, a real
 * slowdown a few calls later all the way. The floor of 1 ns keeps a zero from sticking.
 * Returns the sample as taken. */
static double fold(double *est, uint32_t *n, double x, double weight) {
    const uint32_t k = (*n)++;
    if (x < 1.0) x = 1.0;
    if (k == 0) return x;
    if (k == 1 || (k == 2 && x < *est)) *est = x;
    if (k <= 2) return x;
    if (x > 1.5 * *est) x = 1.5 * *est;
    const double a = k < EA_TUNE_SAMPLES + 2 ? 1.0 / k : weight;
    *est += a * (x - *est);
    return x;
}

void ea_tune_record(ea_sparse_tune *t, int sparse, int n_active, uint64_t ns) {
    const int recheck = t->recheck && explored(t);
    t->recheck = 0;
    /* a call with no active channel costs only the fixed part: it says nothing per channel */
    if (sparse && n_active < 1) return;
    const double x = sparse ? (double)ns / n_active : (double)ns;
    double *est = sparse ? &t->sparse_ns_ch : &t->dense_ns, *last = sparse ? &t->last_sparse_ch : &t->last_dense;
    uint32_t *n = sparse ? &t->n_sparse : &t->n_dense;
    if (recheck) {
        /* the other path, against the path in use's latest call */
        *last = fold(est, n, x, EA_TUNE_RECHECK_WEIGHT);
        const double s = sparse ? *last : t->last_sparse_ch, d = sparse ? t->last_dense : *last;
        t->log_ratio += EA_TUNE_RECHECK_WEIGHT * (log(s / d) - t->log_ratio);
        return;
    }
    *last = fold(est, n, x, 0.2);
    /* the exploration's estimates come from the same few calls: their ratio starts the choice */
    if (explored(t) && t->n_sparse + t->n_dense == 2 * EA_TUNE_SAMPLES) {
        t->log_ratio = log(t->sparse_ns_ch / t->dense_ns);
        t->interval = t->next_check = EA_TUNE_FIRST_RECHECK;
        t->calls = 0;
    }
}
