#include "error.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ea_fail(ea_err *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

void *ea_push(void **items, int *n, int *cap, size_t elem_size) {
    if (*n == *cap) {
        if (*cap > INT32_MAX / 2) return NULL;
        int nc = *cap ? *cap * 2 : 8;
        void *p = realloc(*items, (size_t)nc * elem_size);
        if (!p) return NULL;
        *items = p;
        *cap = nc;
    }
    char *e = (char *)*items + (size_t)(*n) * elem_size;
    memset(e, 0, elem_size);
    (*n)++;
    return e;
}

char *ea_strndup(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}
