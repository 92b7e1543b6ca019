/* CoreInfer's kept rows: once a NeuronMask layer's mask is set, gate/up behind it get a copy
 * of only the kept rows of their weight, prepared like any weight, so a decode step runs the
 * dense GEMV on them (sparse/matmul.c, kept_rows). */
#include <stdlib.h>
#include <string.h>

#include "sparse.h"

void ea_session_drop_kept(ea_session *ss, int si) {
    if (!ss->has_kept[si]) return;
    ea_qweight_release(&ss->kept[si]);
    free(ss->kept_src[si]);
    ss->kept_src[si] = NULL;
    ss->has_kept[si] = 0;
}

/* After a NeuronMask layer's mask changed: a copy of each gate/up weight holding only the kept rows
 * (file layout gathered, then prepared like any weight), or none when too many rows are kept to
 * pay. Returns an EA_ERR_* code. */
int ea_session_prepare_kept(ea_session *ss, int layer) {
    ea_model *m = ss->m;
    for (int si = 0; si < m->n_steps; si++) {
        const step *st = &m->steps[si];
        if (!st->row_src || m->steps[st->row_src - 1].layer != layer) continue;
        const int nr = ss->n_active[st->row_src - 1];
        const int32_t *idx = ss->active[st->row_src - 1];
        ea_session_drop_kept(ss, si);
        /* the GEMV on the kept rows costs in proportion to them: it pays unless nearly all are kept */
        if (!ss->nmask[layer] || nr > 0.9 * st->N || nr == 0 || m->no_kept_rows) continue;
        const ea_qweight *w = &st->qw;
        const size_t row = (size_t)w->n_blocks * w->block_size * w->bits / 8, sc = (size_t)w->n_blocks;
        /* after the scales: zero points, or float minimums (as many as the scales) */
        const size_t zrow = w->has_minimums ? sc * sizeof(float)
                            : w->zero_points ? (w->bits == 4 ? (sc + 1) / 2 : sc) : 0;
        uint8_t *src = malloc((size_t)nr * (row + sc * sizeof(float) + zrow) + 64);
        if (!src) return EA_ERR_NOMEM;
        float *scales = (float *)(src + (((size_t)nr * row + 15) & ~(size_t)15));
        uint8_t *zp = zrow ? (uint8_t *)(scales + (size_t)nr * sc) : NULL;
        float *mins = w->has_minimums ? (float *)zp : NULL;
        int rc = EA_KOK;
        for (int r = 0; r < nr && !rc; r++) {
            memcpy(src + (size_t)r * row, w->data + (size_t)idx[r] * row, row);
            memcpy(scales + (size_t)r * sc, w->scales + (size_t)idx[r] * sc, sc * sizeof(float));
            if (mins) rc = ea_qweight_row_minimums(w, idx[r], mins + (size_t)r * sc);
            else if (zp) memcpy(zp + (size_t)r * zrow, w->zero_points + (size_t)idx[r] * zrow, zrow);
        }
        if (rc) { /* minimums in neither copy (low memory dropped the repack): the row's other paths run */
            free(src);
            continue;
        }
        if (mins ? ea_qweight_init_min(&ss->kept[si], m->isa, w->K, nr, w->bits, w->block_size, src, scales, mins)
                 : ea_qweight_init(&ss->kept[si], m->isa, w->K, nr, w->bits, w->block_size, src, scales, zp)) {
            free(src);
            return EA_ERR_NOMEM;
        }
        if (ss->kept[si].packed) { /* the SIMD kernels read only the repack: keep scales and zero points (minimums) */
            const size_t tail = (size_t)nr * (sc * sizeof(float) + zrow);
            uint8_t *small = malloc(tail);
            if (small) {
                memcpy(small, scales, tail);
                free(src);
                src = small;
                ss->kept[si].data = NULL;
                ss->kept[si].scales = (const float *)small;
                if (mins) ss->kept[si].minimums = (const float *)(small + (size_t)nr * sc * sizeof(float));
                else ss->kept[si].zero_points = zrow ? small + (size_t)nr * sc * sizeof(float) : NULL;
            }
        }
        ss->kept_src[si] = src;
        ss->has_kept[si] = 1;
    }
    return EA_OK;
}
