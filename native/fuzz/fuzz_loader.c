/* Loader fuzzer. Two builds:
 *  - default: a self-contained mutation fuzzer (compile with ASan/UBSan, see
 *    `make fuzz`): fuzz_loader SEED.onnx SECONDS [ITERATIONS]
 *    mutates the seed (bit flips, byte stores, truncations, varint runs,
 *    length/offset/dim corruption via small integer edits, chunk copies)
 *    and loads each result (with --forward, models that still load also run a
 *    short forward).
 *  - -DEA_LIBFUZZER with clang -fsanitize=fuzzer: LLVMFuzzerTestOneInput. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../include/edgeact.h"

/* Forward passes on mutated models that still load (--forward / EA_FUZZ_FORWARD): the
 * activation quantizer now gives non-finite blocks nan outputs instead of converting them
 * to int, so mutated weights that overflow are defined behaviour. */
static int run_forward = 0;

static void exercise(const uint8_t *data, size_t n) {
    ea_model *m = NULL;
    if (ea_model_load_buffer(data, n, NULL, &m) != EA_OK) {
        if (!ea_last_error()[0]) abort(); /* every failure must explain itself */
        return;
    }
    ea_model_info info;
    ea_model_get_info(m, &info);
    ea_session *s = NULL;
    if (run_forward && info.max_context <= 4096 && info.vocab > 0 && info.vocab <= (1 << 20) &&
        ea_session_create(m, 1, 8, 4, &s) == EA_OK) {
        int64_t ids[5] = {0, 1, 2, 3, 4};
        for (int i = 0; i < 5; i++) ids[i] %= info.vocab;
        float *logits = malloc(sizeof(float) * (size_t)info.vocab * 5);
        if (logits) {
            ea_session_forward(s, ids, 5, logits, 1);
            ea_session_forward(s, ids, 1, logits, 0);
        }
        free(logits);
        ea_session_free(s);
    }
    ea_model_free(m);
}

#ifdef EA_LIBFUZZER
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    run_forward = getenv("EA_FUZZ_FORWARD") != NULL;
    exercise(data, size);
    return 0;
}
#else
static uint64_t rng = 0x243F6A8885A308D3ull;
static uint32_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

static size_t mutate(uint8_t *buf, size_t n, size_t cap) {
    int edits = 1 + (int)(rnd() % 4);
    for (int e = 0; e < edits && n > 0; e++) {
        size_t at = rnd() % n;
        switch (rnd() % 8) {
        case 0: buf[at] ^= (uint8_t)(1u << (rnd() % 8)); break;             /* bit flip */
        case 1: buf[at] = (uint8_t)rnd(); break;                            /* random byte */
        case 2: n = at; break;                                              /* truncation */
        case 3: /* varint corruption: a run of continuation bytes */
            for (size_t k = at; k < n && k < at + 1 + rnd() % 12; k++) buf[k] = 0xff;
            break;
        case 4: /* small integer edits hit lengths, offsets, dims and attribute values */
            buf[at] = (uint8_t)(buf[at] + (int)(rnd() % 5) - 2);
            break;
        case 5: { /* interesting values */
            static const uint8_t vals[] = {0x00, 0x01, 0x7f, 0x80, 0xff, 0x40, 0x10};
            buf[at] = vals[rnd() % sizeof vals];
            break;
        }
        case 6: { /* copy a chunk elsewhere */
            size_t len = 1 + rnd() % 32, from = rnd() % n;
            if (from + len <= n && at + len <= n) memmove(buf + at, buf + from, len);
            break;
        }
        case 7: /* grow with junk */
            if (n + 8 <= cap) {
                memmove(buf + at + 8, buf + at, n - at);
                for (int k = 0; k < 8; k++) buf[at + k] = (uint8_t)rnd();
                n += 8;
            }
            break;
        }
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s SEED.onnx SECONDS [ITERATIONS] [--forward]\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    size_t n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *seed = malloc(n), *buf = malloc(n + 4096);
    if (!seed || !buf || fread(seed, 1, n, f) != n) return 2;
    fclose(f);
    const double seconds = atof(argv[2]);
    const long max_iter = argc > 3 && strcmp(argv[3], "--forward") ? atol(argv[3]) : -1;
    for (int i = 3; i < argc; i++) run_forward |= !strcmp(argv[i], "--forward");
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long iter = 0;
    for (;; iter++) {
        if (max_iter >= 0 && iter >= max_iter) break;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((double)(t.tv_sec - t0.tv_sec) + 1e-9 * (double)(t.tv_nsec - t0.tv_nsec) > seconds) break;
        memcpy(buf, seed, n);
        size_t m = mutate(buf, n, n + 4096);
        exercise(buf, m);
    }
    exercise(seed, n);
    printf("fuzz_loader: %ld inputs, no crash\n", iter);
    free(seed);
    free(buf);
    return 0;
}
#endif
