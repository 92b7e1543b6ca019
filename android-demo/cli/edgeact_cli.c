/* edgeact-cli: the runtime as one static binary for a phone or a Pi (adb push it
 * beside a model folder). Runs on token ids — tokenization stays in the SDK or the
 * app — and prints the greedy continuation and the decode speed.
 *
 *   edgeact-cli MODEL_DIR [-n N] [-t THREADS] [--profile] ID [ID ...]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgeact.h"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int usage(void) {
    fprintf(stderr, "usage: edgeact-cli MODEL_DIR [-n N] [-t THREADS] [--profile] TOKEN_ID [TOKEN_ID ...]\n");
    return 2;
}

static int fail(const char *what) {
    fprintf(stderr, "edgeact-cli: error: %s: %s\n", what, ea_last_error());
    return 1;
}

static int parse_int(const char *s, long lo, long hi, long *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return usage();
    const char *dir = argv[1];
    long n_new = 32, threads = 0;
    int profile = 0, n_ids = 0;
    int64_t *ids = calloc((size_t)argc, sizeof *ids);
    if (!ids) return 1;
    for (int i = 2; i < argc; i++) {
        long v;
        if (!strcmp(argv[i], "-n") && i + 1 < argc) {
            if (parse_int(argv[++i], 0, 1 << 20, &n_new)) return usage();
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            if (parse_int(argv[++i], 0, 256, &threads)) return usage();
        } else if (!strcmp(argv[i], "--profile")) {
            profile = 1;
        } else if (parse_int(argv[i], 0, INT32_MAX, &v) == 0) {
            ids[n_ids++] = v;
        } else {
            fprintf(stderr, "edgeact-cli: error: %s is not a token id\n", argv[i]);
            return 2;
        }
    }
    if (n_ids == 0) return usage();

    ea_model *model;
    if (ea_model_load(dir, &model)) return fail("loading the model");
    ea_model_info info;
    ea_model_get_info(model, &info);
    ea_session *sess;
    if (ea_session_create(model, (int)threads, 0, 0, &sess)) return fail("creating a session");
    if (profile) ea_session_profile(sess, 1);
    float *logits = malloc(sizeof(float) * (size_t)info.vocab);
    if (!logits) return 1;

    double t0 = now_s();
    if (ea_session_forward(sess, ids, n_ids, logits, 0)) return fail("prefill");
    double t1 = now_s();
    int produced = 0;
    for (; produced < n_new; produced++) {
        int64_t best = 0;
        for (int v = 1; v < info.vocab; v++)
            if (logits[v] > logits[best]) best = v;
        printf("%lld%c", (long long)best, produced + 1 == n_new ? '\n' : ' ');
        fflush(stdout);
        if (produced + 1 == n_new) { produced++; break; }
        if (ea_session_forward(sess, &best, 1, logits, 0)) return fail("decode");
    }
    double t2 = now_s();
    fprintf(stderr, "[%s, %d threads] prompt %d tokens: %.1f tok/s; %d generated: %.1f tok/s\n",
            info.isa, ea_session_n_threads(sess), n_ids, n_ids / (t1 - t0), produced,
            produced > 1 ? (produced - 1) / (t2 - t1) : 0.0);
    if (profile) {
        int n = ea_session_profile_count(sess);
        for (int i = 0; i < n; i++) {
            ea_profile_record r;
            if (ea_session_profile_get(sess, i, &r) == 0 && r.calls)
                fprintf(stderr, "%-28s %-22s %8lld calls %10.3f ms\n", r.name, r.op_type, (long long)r.calls,
                        (double)r.ns / 1e6);
        }
    }
    free(logits);
    free(ids);
    ea_session_free(sess);
    ea_model_free(model);
    return 0;
}
