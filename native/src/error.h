/* One-line error messages carried from the point of failure to the API. */
#ifndef EDGEACT_ERROR_H
#define EDGEACT_ERROR_H

#include <stddef.h>

typedef struct ea_err {
    char msg[512];
} ea_err;

/* Formats into err (when non-NULL) and returns -1 so callers can `return ea_fail(...)`. */
int ea_fail(ea_err *err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Growable array push: returns a pointer to the new zeroed element or NULL when out of memory. */
void *ea_push(void **items, int *n, int *cap, size_t elem_size);

char *ea_strndup(const char *s, size_t n);

#endif
