/* The measured sparse/dense choice of decode GEMVs (src/sparse_tune.c): exploration,
 * prediction, the periodic refresh and the cap on outlier samples, fed with made-up times
 * (the tests time nothing). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../src/sparse/tune.h"

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
    CHECK(t.log_ratio == log(10.0 / 3000.0), "ratio seeded at %g", t.log_ratio);

    /* prediction: sparse costs 10 ns per channel, dense 3000 ns: sparse below 300 channels */
    CHECK(ea_tune_pick(&t, 200) == 1, "200 channels should run sparse");
    CHECK(ea_tune_pick(&t, 400) == 0, "400 channels should run dense");

    /* re-checks: EA_TUNE_FIRST_RECHECK calls after the exploration, then at doubling
     * intervals up to EA_TUNE_REFRESH (sparse wins by less than EA_TUNE_CLEAR) */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES, 100, 10, 3000);
    int at[16], n_at = 0;
    for (int i = 1; i <= 100; i++) {
        const int p = ea_tune_pick(&t, 250); /* 2500 vs 3000 ns */
        if (!p && n_at < 16) at[n_at++] = i;
        ea_tune_record(&t, p, 250, (uint64_t)(p ? 2500 : 3000));
    }
    const int want_at[] = {4, 12, 28, 60, 92};
    CHECK(n_at == 5, "%d re-checks in 100 calls", n_at);
    for (int i = 0; i < 5 && i < n_at; i++) CHECK(at[i] == want_at[i], "re-check %d at call %d, not %d", i, at[i], want_at[i]);

    /* in the steady state, of EA_TUNE_REFRESH decisions exactly one runs the other path; of
     * EA_TUNE_REFRESH_CLEAR where it is predicted EA_TUNE_CLEAR x slower */
    const struct { int n_active; double sparse_ch, dense; int window, sparse_calls; } cases[] = {
        {250, 10, 3000, 4 * EA_TUNE_REFRESH, 4 * EA_TUNE_REFRESH - 4},           /* sparse by 1.2x */
        {330, 10, 3000, 4 * EA_TUNE_REFRESH, 4},                                 /* dense by 1.1x */
        {100, 10, 3000, 4 * EA_TUNE_REFRESH_CLEAR, 4 * EA_TUNE_REFRESH_CLEAR - 4}, /* sparse by 3x */
        {600, 10, 3000, 4 * EA_TUNE_REFRESH_CLEAR, 4},                           /* dense by 2x */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        memset(&t, 0, sizeof t);
        drive(&t, 2 * EA_TUNE_SAMPLES, cases[c].n_active, cases[c].sparse_ch, cases[c].dense);
        drive(&t, 2 * EA_TUNE_REFRESH_CLEAR, cases[c].n_active, cases[c].sparse_ch, cases[c].dense);
        const int s = drive(&t, cases[c].window, cases[c].n_active, cases[c].sparse_ch, cases[c].dense);
        CHECK(s == cases[c].sparse_calls, "%d channels: sparse calls %d of %d, want %d", cases[c].n_active, s,
              cases[c].window, cases[c].sparse_calls);
    }
    int s;

    /* the machine changes (dense slows 3x): the refresh samples move the estimate and the choice */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES, 400, 10, 3000);
    CHECK(drive(&t, EA_TUNE_REFRESH, 400, 10, 3000) == 3, "dense should win before the change (re-checks at 4, 12, 28)");
    s = drive(&t, 40 * EA_TUNE_REFRESH, 400, 10, 9000);
    CHECK(ea_tune_pick(&t, 400) == 1, "sparse should win after dense slowed (sparse calls %d)", s);

    /* the VM slows both paths alike (2x for a stretch, then back): the path in use is timed on
     * every call and the other one only on re-checks, yet the choice holds (sparse wins by 1.3x:
     * absolute estimates flipped to dense within three slowed calls) */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES + 2 * EA_TUNE_REFRESH + 5, 100, 10, 1300);
    s = drive(&t, 3 * EA_TUNE_REFRESH, 100, 20, 2600);
    CHECK(s == 3 * EA_TUNE_REFRESH - 3, "slowed machine: sparse calls %d of %d", s, 3 * EA_TUNE_REFRESH);
    s = drive(&t, 3 * EA_TUNE_REFRESH, 100, 10, 1300);
    CHECK(s == 3 * EA_TUNE_REFRESH - 3, "after the slowdown: sparse calls %d of %d", s, 3 * EA_TUNE_REFRESH);

    /* a wrong start (exploration saw sparse 2x faster than it runs: the first calls after a prompt)
     * is put right by the first re-check or two */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES, 100, 10, 1300);
    s = drive(&t, EA_TUNE_REFRESH, 100, 20, 1300);
    CHECK(s <= 3 * EA_TUNE_FIRST_RECHECK, "sparse 1.5x slower: still sparse on %d of %d calls", s, EA_TUNE_REFRESH);
    CHECK(ea_tune_pick(&t, 100) == 0, "dense should win after the re-checks");

    /* a preempted sample (100x) counts as 1.5x the estimate: one outlier does not flip a
     * choice with a 1.3x margin (sparse 1000 ns, dense 1300) */
    memset(&t, 0, sizeof t);
    drive(&t, 2 * EA_TUNE_SAMPLES, 100, 10, 1300);
    drive(&t, 66, 100, 10, 1300); /* the next re-check is at call 92 */
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
