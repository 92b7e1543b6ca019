#include "protobuf.h"

#include <string.h>

int pb_varint(pb_reader *r, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) return -1;
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return -1; /* more than 10 bytes */
}

int pb_tag(pb_reader *r, uint32_t *field, int *wire_type) {
    uint64_t t;
    if (pb_varint(r, &t)) return -1;
    if ((t >> 3) == 0 || (t >> 3) > 0x1fffffff) return -1;
    *field = (uint32_t)(t >> 3);
    *wire_type = (int)(t & 7);
    return 0;
}

int pb_len(pb_reader *r, const uint8_t **data, size_t *n) {
    uint64_t len;
    if (pb_varint(r, &len)) return -1;
    if (len > (uint64_t)(r->end - r->p)) return -1;
    *data = r->p;
    *n = (size_t)len;
    r->p += len;
    return 0;
}

int pb_fixed32(pb_reader *r, uint32_t *v) {
    if (r->end - r->p < 4) return -1;
    memcpy(v, r->p, 4); /* little-endian hosts only (x86-64, aarch64) */
    r->p += 4;
    return 0;
}

int pb_skip(pb_reader *r, int wire_type) {
    uint64_t v;
    const uint8_t *d;
    size_t n;
    switch (wire_type) {
    case PB_VARINT: return pb_varint(r, &v);
    case PB_I64:
        if (r->end - r->p < 8) return -1;
        r->p += 8;
        return 0;
    case PB_LEN: return pb_len(r, &d, &n);
    case PB_I32:
        if (r->end - r->p < 4) return -1;
        r->p += 4;
        return 0;
    default: return -1; /* groups (3, 4) are not used by ONNX */
    }
}
