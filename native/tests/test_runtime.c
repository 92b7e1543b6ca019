/* Runtime self-tests through the public API on tests/data/tiny (an int4 model
 * written by make_fixture.py): KV-cache decode vs full recompute, thread-count
 * independence, steering and hidden capture, profiler records, argument
 * errors, and every truncation of the file failing cleanly.
 *   test_runtime DATA_DIR        (exit 0 when all checks pass) */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../include/edgeact.h"
#include "../include/edgeact_tools.h"

#define CHECK_CONTEXT() fprintf(stderr, " [last error: %s]\n", ea_last_error())
#include "check.h"

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates as a failure */
    }
    return m;
}

static unsigned char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)len);
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n = (size_t)len;
    return buf;
}

enum { T = 12 };

/* A sparse folder (EA_TEST_SPARSE_DIR, written by the pytest that runs this under ASan):
 * loaded with EA_LOAD_SPARSE_LOWMEM, token-by-token decode (the input-sparse GEMV) equals the
 * fixed-rule load's (EDGEACT_SPARSE_STATIC: the tiny widths take the dense GEMV on the masked
 * input) bit for bit, and a prompt's rows, run on the channel-major copy, equal that load's GEMM
 * prefill. isa: EDGEACT_ISA for both loads (NULL: the best). The scalar build has no dense
 * repack to drop: its low-memory load keeps the GEMM, and its measured prefill explores the rows
 * first, so there the rows are checked against the GEMM that way. */
static void restore_env(const char *name, char *saved) {
    if (saved) setenv(name, saved, 1);
    else unsetenv(name);
    free(saved);
}

static char *saved_env(const char *name) {
    const char *v = getenv(name);
    return v ? strdup(v) : NULL;
}

static void check_sparse_lowmem(const char *dir, const char *isa) {
    ea_model *def = NULL, *low = NULL;
    /* the fixed-rule load (the environment as the caller gave it after) */
    char *fixed = saved_env("EDGEACT_SPARSE_STATIC"), *lowmem = saved_env("EDGEACT_SPARSE_LOWMEM"),
         *isa_env = saved_env("EDGEACT_ISA");
    if (isa) setenv("EDGEACT_ISA", isa, 1);
    setenv("EDGEACT_SPARSE_STATIC", "1", 1);
    unsetenv("EDGEACT_SPARSE_LOWMEM");
    CHECK(ea_model_load(dir, &def) == EA_OK, "load %s", dir);
    unsetenv("EDGEACT_SPARSE_STATIC");
    CHECK(ea_model_load_opts(dir, EA_LOAD_SPARSE_LOWMEM, &low) == EA_OK, "load %s, low memory", dir);
    restore_env("EDGEACT_SPARSE_STATIC", fixed);
    restore_env("EDGEACT_SPARSE_LOWMEM", lowmem);
    restore_env("EDGEACT_ISA", isa_env);
    if (!def || !low) goto out;
    ea_model_info di, li;
    ea_model_get_info(def, &di);
    ea_model_get_info(low, &li);
    CHECK(strcmp(di.isa, "scalar") ? li.weight_bytes_repacked < di.weight_bytes_repacked
                                   : li.weight_bytes_repacked == di.weight_bytes_repacked,
          "isa %s: low memory repacked %llu of %llu bytes", di.isa, (unsigned long long)li.weight_bytes_repacked,
          (unsigned long long)di.weight_bytes_repacked);
    enum { N = 24 };
    const int V = di.vocab;
    int64_t ids[N];
    for (int i = 0; i < N; i++) ids[i] = 3 + (i * 11) % (V - 3);
    float *a = malloc(sizeof(float) * N * V), *b = malloc(sizeof(float) * N * V);
    ea_session *sa = NULL, *sb = NULL;
    CHECK(ea_session_create(def, 2, N, 0, &sa) == EA_OK && ea_session_create(low, 2, N, 0, &sb) == EA_OK, "sessions");
    if (!a || !b || !sa || !sb) goto done;
    for (int i = 0; i < N; i++) {
        CHECK(ea_session_forward(sa, ids + i, 1, a + (size_t)i * V, 0) == EA_OK, "decode %d", i);
        CHECK(ea_session_forward(sb, ids + i, 1, b + (size_t)i * V, 0) == EA_OK, "decode %d, low memory", i);
    }
    CHECK(memcmp(a, b, sizeof(float) * N * V) == 0, "isa %s: low-memory decode differs from the dense GEMV's", di.isa);
    ea_session_reset(sa);
    ea_session_reset(sb);
    CHECK(ea_session_forward(sa, ids, N, a, 1) == EA_OK && ea_session_forward(sb, ids, N, b, 1) == EA_OK, "prefill");
    CHECK(memcmp(a, b, sizeof(float) * N * V) == 0, "isa %s: prefill rows differ from the GEMM's by %g", di.isa,
          max_abs_diff(a, b, (size_t)N * V));
done:
    ea_session_free(sa);
    ea_session_free(sb);
    free(a);
    free(b);
out:
    ea_model_free(def);
    ea_model_free(low);
}

/* A shared-table folder (each of EA_TEST_SHARED_DIRS, ':'-separated, written by the pytest): its
 * layers add nothing, so hidden.0 of every token is the GatherBlockQuantized lookup, which must
 * equal the folder's lookup.f32 ([vocab, hidden], numpy's dequantization of lm_head's table) bit
 * for bit, read from lm_head's repack (the best ISA) and from the file layout (scalar). */
static void check_shared_table(const char *dir, const char *isa) {
    char *isa_env = saved_env("EDGEACT_ISA"), path[1100];
    if (isa) setenv("EDGEACT_ISA", isa, 1);
    ea_model *m = NULL;
    CHECK(ea_model_load(dir, &m) == EA_OK, "load %s", dir);
    restore_env("EDGEACT_ISA", isa_env);
    if (!m) return;
    ea_model_info info;
    ea_model_get_info(m, &info);
    const int V = info.vocab, H = info.hidden, L = info.n_steer_layers ? info.n_steer_layers : info.n_layers;
    snprintf(path, sizeof path, "%s/lookup.f32", dir);
    size_t n = 0;
    float *want = (float *)read_file(path, &n), *h = NULL, *logits = NULL;
    ea_session *s = NULL;
    CHECK(want && n == sizeof(float) * (size_t)V * H, "%s: %zu bytes, want %d x %d floats", path, n, V, H);
    enum { C = 16 };
    h = malloc(sizeof(float) * (size_t)L * C * H);
    logits = malloc(sizeof(float) * (size_t)V);
    CHECK(ea_session_create(m, 2, C, C, &s) == EA_OK && ea_session_capture_hidden(s, 1) == EA_OK, "session");
    if (!want || n != sizeof(float) * (size_t)V * H || !h || !logits || !s) goto done;
    int bad = -1;
    for (int at = 0; at < V && bad < 0; at += C) {
        int64_t ids[C];
        const int k = V - at < C ? V - at : C;
        for (int i = 0; i < k; i++) ids[i] = at + i;
        ea_session_reset(s);
        CHECK(ea_session_forward(s, ids, k, logits, 0) == EA_OK && ea_session_hidden_tokens(s) == k &&
                  ea_session_get_hidden(s, h, (size_t)L * k * H) == EA_OK,
              "forward rows %d..", at);
        if (memcmp(h, want + (size_t)at * H, sizeof(float) * (size_t)k * H)) bad = at;
    }
    CHECK(bad < 0, "isa %s, %s: the lookup of rows %d.. differs from numpy's", info.isa, dir, bad);
done:
    ea_session_free(s);
    ea_model_free(m);
    free(want);
    free(h);
    free(logits);
}

/* A folder with sliding-window layers (EA_TEST_SLIDING_DIR, window 8: a cache of 71 rows that
 * moves its last 39 to the front when full): a forward failing at its last step (injected) after
 * the caches moved leaves the session either as it was (the retry gives a clean session's logits
 * bit for bit) or, when the window of its position is gone, refusing to go on until a reset. */
static void check_failed_forward(const char *dir) {
    ea_model *m = NULL;
    CHECK(ea_model_load(dir, &m) == EA_OK, "load %s", dir);
    if (!m) return;
    ea_model_info info;
    ea_model_get_info(m, &info);
    enum { N = 110 };
    const int V = info.vocab;
    int64_t ids[N];
    for (int i = 0; i < N; i++) ids[i] = 3 + (i * 13) % (V - 3);
    float *want = malloc(sizeof(float) * (size_t)V * N), *got = malloc(sizeof(float) * (size_t)V * N);
    ea_session *clean = NULL, *s = NULL;
    CHECK(ea_session_create(m, 1, 128, 10, &clean) == EA_OK && ea_session_create(m, 1, 128, 10, &s) == EA_OK,
          "sessions");
    if (!want || !got || !clean || !s) goto done;
    const int steps = ea_session_profile_count(s);
    /* 60 held, 20 more in two chunks: the caches move at position 71; position 60's window stays */
    CHECK(ea_session_forward(clean, ids, 80, want, 1) == EA_OK, "clean forward");
    CHECK(ea_session_forward(s, ids, 60, got, 1) == EA_OK, "forward 60");
    CHECK(ea_session_inject_failure(s, 2 * steps) == EA_OK, "inject");
    CHECK(ea_session_forward(s, ids + 60, 20, got, 1) == EA_ERR_KERNEL && strstr(ea_last_error(), "injected") &&
              ea_session_n_past(s) == 60,
          "injected failure: %s", ea_last_error());
    CHECK(ea_session_forward(s, ids + 60, 20, got, 1) == EA_OK &&
              !memcmp(got, want + (size_t)60 * V, sizeof(float) * (size_t)V * 20),
          "the retry differs from a clean session's logits");
    /* 10 held, 100 more: the caches then hold positions 64.. only */
    ea_session_reset(s);
    CHECK(ea_session_forward(s, ids, 10, got, 1) == EA_OK, "forward 10");
    CHECK(ea_session_inject_failure(s, 10 * steps) == EA_OK, "inject");
    CHECK(ea_session_forward(s, ids + 10, 100, got, 1) == EA_ERR_KERNEL && strstr(ea_last_error(), "reset"),
          "failure past the window: %s", ea_last_error());
    CHECK(ea_session_forward(s, ids + 10, 1, got, 1) == EA_ERR_STATE, "a forward after the window was lost ran");
    CHECK(ea_session_truncate(s, 5) == EA_ERR_ARG, "a truncation into the lost rows was accepted");
    ea_session_reset(s);
    ea_session_reset(clean);
    CHECK(ea_session_forward(s, ids, N, got, 1) == EA_OK && ea_session_forward(clean, ids, N, want, 1) == EA_OK &&
              !memcmp(got, want, sizeof(float) * (size_t)V * N),
          "after a reset the session differs from a clean one");
done:
    ea_session_free(clean);
    ea_session_free(s);
    ea_model_free(m);
    free(want);
    free(got);
}

int main(int argc, char **argv) {
    const char *data = argc > 1 ? argv[1] : "tests/data";
    char dir[1024], path[1100];
    snprintf(dir, sizeof dir, "%s/tiny", data);
    snprintf(path, sizeof path, "%s/model.onnx", dir);

    ea_model *model = NULL;
    if (ea_model_load(dir, &model) != EA_OK) {
        fprintf(stderr, "cannot load %s: %s\n", dir, ea_last_error());
        return 2;
    }
    ea_model_info info;
    CHECK(ea_model_get_info(model, &info) == EA_OK, "info");
    CHECK(info.n_layers == 2 && info.vocab == 40 && info.hidden == 32 && info.max_context == 64 &&
              info.n_steer_layers == 2 && info.head_dim == 16,
          "info: layers %d vocab %d hidden %d max_context %d", info.n_layers, info.vocab, info.hidden,
          info.max_context);
    printf("model: isa %s, mapped %llu, copied %llu, repacked %llu bytes\n", info.isa,
           (unsigned long long)info.weight_bytes_mapped, (unsigned long long)info.weight_bytes_copied,
           (unsigned long long)info.weight_bytes_repacked);
    const int V = info.vocab, H = info.hidden;

    /* the bandwidth probes `edgeact bench` prints (under ASan in CI: the row walk stays inside) */
    CHECK(ea_measure_read_bandwidth(2, 4u << 20, 1) > 0, "sequential probe");
    CHECK(ea_measure_rows_read_bandwidth(2, 4u << 20, 1024, 0.5, 1) > 0, "rows probe, half the rows");
    CHECK(ea_measure_rows_read_bandwidth(1, (4u << 20) + 100, 192, 1.0, 1) > 0, "rows probe, every row");
    CHECK(ea_measure_rows_read_bandwidth(2, 4u << 20, 4096, 0.001, 1) > 0, "rows probe, almost no row");
    CHECK(ea_measure_rows_read_bandwidth(2, 4u << 20, 100, 0.5, 1) < 0, "rows of 100 bytes accepted");
    CHECK(ea_measure_rows_read_bandwidth(2, 4u << 20, 1024, 0.0, 1) < 0, "no active share accepted");
    CHECK(ea_measure_rows_read_bandwidth(2, 4u << 20, 1u << 20, 0.5, 1) < 0, "4 rows accepted");

    int64_t ids[T];
    for (int i = 0; i < T; i++) ids[i] = 3 + (i * 7) % (V - 3);
    float *full = malloc(sizeof(float) * T * V), *inc = malloc(sizeof(float) * T * V), *last = malloc(sizeof(float) * V);

    /* full prefill vs chunked prefill + one-token decode */
    ea_session *a = NULL, *b = NULL;
    CHECK(ea_session_create(model, 1, 0, 0, &a) == EA_OK, "session a");
    CHECK(ea_session_create(model, 2, 32, 3, &b) == EA_OK, "session b");
    CHECK(ea_session_n_ctx(a) == 64, "default n_ctx is min(max_context, 4096): %d", ea_session_n_ctx(a));
    CHECK(ea_session_forward(a, ids, T, full, 1) == EA_OK, "forward full");
    CHECK(ea_session_forward(b, ids, 5, inc, 1) == EA_OK, "forward prefix");
    for (int i = 5; i < T; i++) CHECK(ea_session_forward(b, ids + i, 1, inc + (size_t)i * V, 1) == EA_OK, "decode %d", i);
    CHECK(ea_session_n_past(b) == T, "n_past %d", ea_session_n_past(b));
    CHECK(max_abs_diff(full, inc, (size_t)T * V) <= 1e-4f, "KV decode vs full: %g", max_abs_diff(full, inc, (size_t)T * V));
    for (size_t i = 0; i < (size_t)T * V; i++)
        if (!isfinite(full[i])) {
            CHECK(0, "non-finite logit at %zu", i);
            break;
        }

    /* last-token logits equal the last row of all logits */
    ea_session_reset(a);
    CHECK(ea_session_forward(a, ids, T, last, 0) == EA_OK, "forward last");
    CHECK(max_abs_diff(last, full + (size_t)(T - 1) * V, V) <= 1e-5f, "last-row logits");

    /* errors leave the session usable */
    int64_t bad = V;
    CHECK(ea_session_forward(a, &bad, 1, last, 0) == EA_ERR_ARG && strstr(ea_last_error(), "outside the vocabulary"),
          "bad token id");
    int64_t many[64] = {0};
    CHECK(ea_session_forward(a, many, 64, last, 0) == EA_ERR_CONTEXT && strstr(ea_last_error(), "context overflow"),
          "context overflow");
    CHECK(ea_session_n_past(a) == T, "n_past unchanged after errors");
    CHECK(ea_session_forward(a, ids, 0, last, 0) == EA_ERR_ARG, "zero tokens");
    ea_session *c = NULL;
    CHECK(ea_session_create(model, 1, 65, 0, &c) == EA_ERR_ARG && strstr(ea_last_error(), "max_context"), "n_ctx too big");

    /* steering: add at the last layer shows up in the captured hidden state */
    float *plain = malloc(sizeof(float) * 2 * T * H), *steered = malloc(sizeof(float) * 2 * T * H);
    float add[64], nan_add[64];
    for (int i = 0; i < H; i++) add[i] = 0.25f * (float)(i % 5) - 0.5f, nan_add[i] = 0.0f;
    nan_add[3] = NAN;
    CHECK(ea_session_get_hidden(a, plain, 1) == EA_ERR_STATE, "hidden while capture is off");
    CHECK(ea_session_capture_hidden(a, 1) == EA_OK, "capture on");
    ea_session_reset(a);
    CHECK(ea_session_forward(a, ids, T, last, 0) == EA_OK, "forward capture");
    CHECK(ea_session_hidden_tokens(a) == T, "hidden tokens");
    CHECK(ea_session_get_hidden(a, plain, (size_t)2 * T * H) == EA_OK, "get hidden");
    CHECK(ea_session_set_steering(a, 1, nan_add, NULL, 0) == EA_ERR_ARG && strstr(ea_last_error(), "non-finite"), "NaN add");
    CHECK(ea_session_set_steering(a, 2, add, NULL, 0) == EA_ERR_ARG && strstr(ea_last_error(), "out of range"), "layer");
    CHECK(ea_session_set_steering(a, 1, add, NULL, 0) == EA_OK, "set steering");
    ea_session_reset(a);
    CHECK(ea_session_forward(a, ids, T, last, 0) == EA_OK, "forward steered");
    CHECK(ea_session_get_hidden(a, steered, (size_t)2 * T * H) == EA_OK, "get hidden steered");
    CHECK(max_abs_diff(plain, steered, (size_t)T * H) == 0.0f, "layer 0 unchanged by steering layer 1");
    float worst = 0.0f;
    for (int t = 0; t < T; t++)
        for (int k = 0; k < H; k++) {
            float d = fabsf(steered[(size_t)(T + t) * H + k] - (plain[(size_t)(T + t) * H + k] + add[k]));
            if (d > worst) worst = d;
        }
    CHECK(worst <= 1e-5f, "steered hidden = plain + add: %g", worst);
    /* ablating a unit direction zeroes the hidden state's component along it */
    float axis[64] = {0};
    axis[5] = 1.0f;
    CHECK(ea_session_set_steering(a, 1, NULL, axis, 1) == EA_OK, "ablate");
    ea_session_reset(a);
    CHECK(ea_session_forward(a, ids, T, last, 0) == EA_OK, "forward ablated");
    CHECK(ea_session_get_hidden(a, steered, (size_t)2 * T * H) == EA_OK, "get hidden ablated");
    for (int t = 0; t < T; t++) CHECK(fabsf(steered[(size_t)(T + t) * H + 5]) <= 1e-6f, "ablated component t=%d", t);
    CHECK(ea_session_clear_steering(a, -1) == EA_OK, "clear");
    ea_session_reset(a);
    CHECK(ea_session_forward(a, ids, T, last, 0) == EA_OK, "forward cleared");
    CHECK(max_abs_diff(last, full + (size_t)(T - 1) * V, V) <= 1e-5f, "cleared steering restores the logits");

    /* profiler */
    CHECK(ea_session_profile(a, 1) == EA_OK, "profile on");
    CHECK(ea_session_forward(a, ids, 1, last, 0) == EA_OK, "forward profiled");
    int nrec = ea_session_profile_count(a), gqa = 0;
    for (int i = 0; i < nrec; i++) {
        ea_profile_record r;
        CHECK(ea_session_profile_get(a, i, &r) == EA_OK && r.calls == 1, "record %d", i);
        gqa += !strcmp(r.op_type, "GroupQueryAttention");
    }
    CHECK(nrec > 10 && gqa == 2, "profile records %d, GQA %d", nrec, gqa);

    /* thread count does not change results */
    ea_session_reset(b);
    CHECK(ea_session_forward(b, ids, T, inc, 1) == EA_OK, "forward 2 threads");
    CHECK(max_abs_diff(full, inc, (size_t)T * V) <= 1e-5f, "1 vs 2 threads");

    ea_session_free(a);
    ea_session_free(b);
    ea_model_free(model);

    /* every truncation (in strides) is a clean error */
    size_t n = 0;
    unsigned char *buf = read_file(path, &n);
    CHECK(buf != NULL, "read %s", path);
    int cuts = 0;
    for (size_t cut = 0; buf && cut < n; cut += 1 + cut / 64) {
        ea_model *m = NULL;
        int rc = ea_model_load_buffer(buf, cut, NULL, &m);
        CHECK(rc != EA_OK && m == NULL && ea_last_error()[0], "truncation at %zu loaded", cut);
        if (m) ea_model_free(m);
        cuts++;
    }
    ea_model *m = NULL;
    CHECK(buf && ea_model_load_buffer(buf, n, NULL, &m) == EA_OK, "whole buffer loads");
    ea_model_free(m);
    free(buf);
    CHECK(ea_model_load("/nonexistent-edgeact", &m) == EA_ERR_IO && strstr(ea_last_error(), "cannot open"), "missing");
    CHECK(ea_model_load_opts("/nonexistent-edgeact", 2u, &m) == EA_ERR_ARG && !m && strstr(ea_last_error(), "load flags"),
          "unknown load flag");
    CHECK(ea_model_load_opts("/nonexistent-edgeact", EA_LOAD_SPARSE_LOWMEM, &m) == EA_ERR_IO, "known flag, missing folder");

    /* benchmark entry: int4 block 32, symmetric, against a float reference */
    enum { BK = 64, BN = 8 };
    uint8_t B[BN * 2 * 16];
    float sc[BN * 2], x[BK], y[BN];
    for (int i = 0; i < (int)sizeof B; i++) B[i] = (uint8_t)((i * 37 + 11) & 0xff);
    for (int i = 0; i < BN * 2; i++) sc[i] = 0.01f * (float)(i + 1);
    for (int i = 0; i < BK; i++) x[i] = sinf((float)i);
    ea_bench_qmatmul *q = NULL;
    CHECK(ea_bench_qmatmul_create(BK, BN, 4, 32, B, sc, NULL, 1, &q) == EA_OK, "bench create");
    CHECK(q && ea_bench_qmatmul_run(q, x, 1, y) == EA_OK, "bench run");
    for (int nn = 0; q && nn < BN; nn++) {
        double ref = 0, mag = 0;
        for (int k = 0; k < BK; k++) {
            uint8_t byte = B[(nn * 2 + k / 32) * 16 + (k % 32) / 2];
            int qv = (k % 2) ? byte >> 4 : byte & 15;
            double w = (qv - 8) * sc[nn * 2 + k / 32];
            ref += w * x[k];
            mag += fabs(w * x[k]);
        }
        CHECK(fabs(y[nn] - ref) <= 0.02 * mag + 1e-6, "bench row %d: %g vs %g", nn, y[nn], ref);
    }
    ea_bench_qmatmul_free(q);
    CHECK(ea_bench_qmatmul_create(BK, BN, 3, 32, B, sc, NULL, 1, &q) == EA_ERR_ARG, "bench bad bits");

    if (getenv("EA_TEST_SPARSE_DIR")) {
        check_sparse_lowmem(getenv("EA_TEST_SPARSE_DIR"), NULL);
        check_sparse_lowmem(getenv("EA_TEST_SPARSE_DIR"), "scalar");
    }
    if (getenv("EA_TEST_SLIDING_DIR")) check_failed_forward(getenv("EA_TEST_SLIDING_DIR"));
    if (getenv("EA_TEST_SHARED_DIRS")) {
        char *dirs = strdup(getenv("EA_TEST_SHARED_DIRS")), *save = NULL;
        for (char *d = dirs ? strtok_r(dirs, ":", &save) : NULL; d; d = strtok_r(NULL, ":", &save)) {
            check_shared_table(d, NULL);
            check_shared_table(d, "scalar");
        }
        free(dirs);
    }

    free(full);
    free(inc);
    free(last);
    free(plain);
    free(steered);
    printf("test_runtime: %d truncations rejected; %s: %d failure(s)\n", cuts, failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
