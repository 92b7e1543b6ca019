/* Protobuf wire-format reading over a byte range: every read is bounds-checked
 * and reports truncation instead of reading past the end. */
#ifndef EDGEACT_PROTOBUF_H
#define EDGEACT_PROTOBUF_H

#include <stddef.h>
#include <stdint.h>

enum { PB_VARINT = 0, PB_I64 = 1, PB_LEN = 2, PB_I32 = 5 };

typedef struct pb_reader {
    const uint8_t *p, *end;
} pb_reader;

static inline pb_reader pb_make(const uint8_t *p, size_t n) {
    pb_reader r = {p, p + n};
    return r;
}
static inline int pb_done(const pb_reader *r) { return r->p >= r->end; }

/* Each returns 0, or -1 when the data is truncated or malformed. */
int pb_varint(pb_reader *r, uint64_t *v);
int pb_tag(pb_reader *r, uint32_t *field, int *wire_type);
int pb_len(pb_reader *r, const uint8_t **data, size_t *n);
int pb_fixed32(pb_reader *r, uint32_t *v);
int pb_skip(pb_reader *r, int wire_type);

#endif
