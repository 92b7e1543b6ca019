/* The C tests' check: counts a failure and says where, without stopping the program, so one
 * run reports every failing case. A test file may define CHECK_CONTEXT() before including
 * this to add its own context to each failure line (test_runtime: the library's last error). */
#ifndef EDGEACT_TESTS_CHECK_H
#define EDGEACT_TESTS_CHECK_H

#include <stdio.h>

#ifndef CHECK_CONTEXT
#define CHECK_CONTEXT() fputc('\n', stderr)
#endif

static int failures = 0;
#define CHECK(cond, ...)                                     \
    do {                                                     \
        if (!(cond)) {                                       \
            failures++;                                      \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                    \
            CHECK_CONTEXT();                                 \
        }                                                    \
    } while (0)

#endif
