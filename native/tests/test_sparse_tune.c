/* The measured sparse/dense choice of decode GEMVs (src/sparse_tune.c): exploration,
 * prediction, the periodic refresh and the cap on outlier samples, fed with made-up times
 * (the tests time nothing). */
#include <stdio.h>
#include <string.h>

#include "../src/sparse_tune.h"

#include "check.h"

/* Runs calls with n_active channels where a sparse run costs sparse_ch ns per channel and a
 * dense run dense ns; returns how many of `calls` took the sparse path. */
static int drive(ea_sparse_tune *t, int calls, int n_active, double sparse_ch, double dense) {
    int sparse_calls = 0;
    for (int i = 0; i < calls; i++) {
        const int s = ea_tune_pick(t, n_active);
        sparse_calls += s;
        ea_tune_record(t, s, n_active, (uint64_t)(s ? sparse_ch * n_active : dense));
    }
    return sparse_calls;
}

int main(void) {
    /* exploration: sparse first, then alternating, until each path has EA_TUNE_SAMPLES samples */
    ea_sparse_tune t;
    memset(&t, 0, sizeof t);
    for (int i = 0; i < 2 * EA_TUNE_SAMPLES; i++) {
        const int s = ea_tune_pick(&t, 100);
        CHECK(s == !(i & 1), "exploration call %d picked %d", i, s);
        ea_tune_record(&t, s, 100, s ? 1000 : 3000);
    }
    CHECK(t.n_sparse == EA_TUNE_SAMPLES && t.n_dense == EA_TUNE_SAMPLES, "samples %u %u", t.n_sparse, t.n_dense);
    CHECK(t.sparse_ns_ch == 10.0 && t.dense_ns == 3000.0, "estimates %g %g", t.sparse_ns_ch, t.dense_ns);

    /* prediction: sparse costs 10 ns per channel, dense 3000 ns: sparse below 300 channels */
    CHECK(ea_tune_pick(&t, 200) == 1, "200 channels should run sparse");
    CHECK(ea_tune_pick(&t, 400) == 0, "400 channels should run dense");

    /* refresh: of EA_TUNE_REFRESH decisions where sparse wins by less than EA_TUNE_CLEAR,
     * exactly one runs dense; where it wins by more, one of EA_TUNE_REFRESH_CLEAR */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES, 100, 10, 3000);
    int s = drive(&t, 4 * EA_TUNE_REFRESH, 250, 10, 3000); /* 2500 vs 3000 ns */
    CHECK(s == 4 * EA_TUNE_REFRESH - 4, "sparse calls %d of %d", s, 4 * EA_TUNE_REFRESH);
    s = drive(&t, 4 * EA_TUNE_REFRESH, 330, 10, 3000); /* dense wins at 330 channels, by 1.1x */
    CHECK(s == 4, "sparse calls %d of %d (refresh only)", s, 4 * EA_TUNE_REFRESH);
    s = drive(&t, 4 * EA_TUNE_REFRESH_CLEAR, 100, 10, 3000); /* 1000 vs 3000 ns */
    CHECK(s == 4 * EA_TUNE_REFRESH_CLEAR - 4, "sparse calls %d of %d (clear margin)", s, 4 * EA_TUNE_REFRESH_CLEAR);
    s = drive(&t, 4 * EA_TUNE_REFRESH_CLEAR, 600, 10, 3000); /* dense wins by 2x */
    CHECK(s == 4, "sparse calls %d of %d (clear margin, refresh only)", s, 4 * EA_TUNE_REFRESH_CLEAR);

    /* the machine changes (dense slows 3x): the refresh samples move the estimate and the choice */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES, 400, 10, 3000);
    CHECK(drive(&t, EA_TUNE_REFRESH, 400, 10, 3000) == 1, "dense should win before the change");
    s = drive(&t, 40 * EA_TUNE_REFRESH, 400, 10, 9000);
    CHECK(ea_tune_pick(&t, 400) == 1, "sparse should win after dense slowed (sparse calls %d)", s);

    /* a preempted sample (100x) counts as 1.5x the estimate: one outlier does not flip a
     * choice with a 1.3x margin (sparse 1000 ns, dense 1300) */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES + 10, 100, 10, 1300);
    ea_tune_record(&t, 1, 100, 100000);
    CHECK(t.sparse_ns_ch <= 11.0 + 1e-9, "estimate after an outlier: %g ns per channel", t.sparse_ns_ch);
    CHECK(drive(&t, 8, 100, 10, 1300) == 8, "one outlier flipped the choice");

    /* the estimate starts at the lower of the two samples after warm-up: a preempted one is
     * not taken; a sparse call without active channels says nothing per channel */
    memset(&t, 0, sizeof t);
    ea_tune_record(&t, 1, 100, 500);    /* warm-up */
    ea_tune_record(&t, 1, 100, 100000); /* preempted */
    ea_tune_record(&t, 1, 100, 1000);
    CHECK(t.sparse_ns_ch == 10.0, "seeded at %g ns per channel", t.sparse_ns_ch);
    ea_tune_record(&t, 1, 0, 5000);
    CHECK(t.n_sparse == 3 && t.sparse_ns_ch == 10.0, "a call without active channels was counted");
    ea_tune_record(&t, 0, 100, 0);
    ea_tune_record(&t, 0, 100, 0);
    CHECK(t.dense_ns >= 1.0, "a zero sample stuck the estimate at %g", t.dense_ns);

    /* no active channel: the sparse path is free, even where dense wins at 100 */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES, 100, 40, 3000);
    CHECK(ea_tune_pick(&t, 100) == 0 && ea_tune_pick(&t, 0) == 1, "0 channels should run sparse");

    printf("test_sparse_tune: %s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
