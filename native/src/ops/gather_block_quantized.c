/* com.microsoft.GatherBlockQuantized: the embedding lookup of a tied model whose one table is
 * lm_head's MatMulNBits weight (uint8 4-bit or 8-bit blocks along the row, float32 scales,
 * optional zero points; no zero points: 8 for 4 bits, 128 for 8, as onnxruntime). Each
 * looked-up row is dequantized as (q - zero_point) * scale, K padded to whole blocks (a Slice
 * after it drops the padding). The rows are read from lm_head's SIMD repack when it has one:
 * the file's pages of the table were released after the repack, and reading rows there
 * would map them back, a large folio per row, so the table would be resident twice. */
#include <string.h>

#include "../kernels/internal.h"
#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"bits", "block_size", "gather_axis", "quantize_axis", NULL};
    int64_t bits = 4, bs = 128, gax = 0, qax = 1;
    if (ea_check_attrs(b, nd, known) || ea_attr_int(b, nd, "bits", 4, 0, &bits) ||
        ea_attr_int(b, nd, "block_size", 128, 0, &bs) || ea_attr_int(b, nd, "gather_axis", 0, 0, &gax) ||
        ea_attr_int(b, nd, "quantize_axis", 1, 0, &qax))
        return -1;
    if (bits != 4 && bits != 8) NODE_FAIL("bits %lld is not supported (4 or 8)", (long long)bits);
    if (bs != 32 && bs != 64 && bs != 128) NODE_FAIL("block_size %lld is not supported (32, 64 or 128)", (long long)bs);
    if (gax != 0 || (qax != 1 && qax != -1)) NODE_FAIL("only gather_axis 0 and quantize_axis 1 are supported");
    int zpv;
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_get_input(b, nd, 2, 1, &st->in[2]) || ea_get_input(b, nd, 3, 0, &zpv) || ea_only_outputs(b, nd, 1))
        return -1;
    if (m->values[st->in[1]].kind != V_IDS) NODE_FAIL("indices must be the graph input input_ids");
    const onnx_tensor *D = ea_need_const(b, nd, 0, st->in[0], ONNX_UINT8, -1);
    const onnx_tensor *S = D ? ea_need_const(b, nd, 2, st->in[2], ONNX_FLOAT, -1) : NULL;
    if (!S) return -1;
    /* [vocab, row bytes] as the graph's Reshape view gives it, or MatMulNBits' [vocab, blocks, block bytes] */
    const int64_t vocab = D->dims[0], row_bytes = D->ndim == 2 ? D->dims[1] : D->ndim == 3 ? D->dims[1] * D->dims[2] : -1;
    if (ea_check_dim(b, nd, vocab, "vocabulary size") || row_bytes < 1 || row_bytes % (bs * bits / 8))
        NODE_FAIL("data '%s' must be uint8 [vocab, blocks x %lld bytes]", D->name, (long long)(bs * bits / 8));
    const int64_t nb = row_bytes / (bs * bits / 8), K = nb * bs;
    if (ea_check_dim(b, nd, K, "row width")) return -1;
    if (ea_numel(S) != vocab * nb)
        NODE_FAIL("scales '%s' has %d elements, expected vocab x blocks = %lld", S->name, ea_numel(S),
                  (long long)(vocab * nb));
    const uint8_t *zp = NULL;
    if (zpv >= 0) {
        const onnx_tensor *Z = ea_need_const(b, nd, 3, zpv, ONNX_UINT8, -1);
        if (!Z) return -1;
        const int64_t want = (int64_t)ea_qweight_file_bytes((size_t)vocab, (size_t)nb, (int)bs, (int)bits).zero_points;
        if (ea_numel(Z) != want)
            NODE_FAIL("zero_points '%s' has %d elements, expected %lld", Z->name, ea_numel(Z), (long long)want);
        zp = Z->data;
    }
    /* the file layout (scalar: no repack) */
    int rc = ea_qweight_init(&st->qw, EA_ISA_SCALAR, (int)K, (int)vocab, (int)bits, (int)bs, D->data,
                             (const float *)S->data, zp);
    if (rc) NODE_FAIL("%s", ea_kernels_strerror(rc));
    st->qw_ready = 1;
    st->op = OP_GATHER_BQ;
    st->vocab = (int)vocab;
    st->N = (int)K;
    if (m->vocab && m->vocab != st->vocab) NODE_FAIL("a second embedding table with another vocabulary size");
    m->vocab = st->vocab;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, st->N, si);
    return st->out < 0 ? -1 : 0;
}

/* The MatMulNBits step holding a SIMD repack of this step's table (the same initializers), or
 * NULL. Found at run time: lm_head is planned after the lookup, and the search is a few hundred
 * compares per forward call. */
static const step *repack_of(const ea_model *m, const step *st) {
    const ea_qweight *g = &st->qw;
    for (int s = m->n_steps - 1; s >= 0; s--) {
        const step *o = &m->steps[s];
        const ea_qweight *w = &o->qw;
        if (o->op != OP_QMATMUL || !o->qw_ready || !w->packed || w->has_minimums || w->data != g->data ||
            w->N != g->N || w->n_blocks != g->n_blocks || w->bits != g->bits || w->block_size != g->block_size ||
            w->zero_points != g->zero_points)
            continue;
        /* the scales: the same initializer (a graph Reshape view, or the Cast of an fp16 one) */
        const value *a = &m->values[o->in[2]], *b = &m->values[st->in[2]];
        if (w->scales == g->scales || (a->tensor && a->tensor == b->tensor)) return o;
    }
    return NULL;
}

/* Row n of a repacked weight (layout: kernels/internal.h): its 16-byte pieces of each block,
 * the scale and zero point of its lane; the file layout's bits (fp16 scales are exact). */
static void row_from_repack(const ea_qweight *w, int n, float *y) {
    const int bs = w->block_size, nb = w->n_blocks, r = n % EA_QROWS;
    const size_t bpb = (size_t)bs * (size_t)w->bits / 8, subs = bpb / 16, stride = ea_qpack_block_stride(w);
    const size_t zoff = ea_qpack_zp_offset(w), ssz = ea_qpack_scale_size(w->packed_f16);
    int lane = 0;
    while (ea_qpack_lane_row(w->isa, lane) != r) lane++;
    const uint8_t *grp = (const uint8_t *)w->packed + (size_t)(n / EA_QROWS) * nb * stride;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * stride, *sp = blk + EA_QROWS * bpb + (size_t)lane * ssz;
        float sc;
        if (w->packed_f16) {
            uint16_t h;
            memcpy(&h, sp, sizeof h);
            sc = ea_f16_to_f32(h);
        } else {
            memcpy(&sc, sp, sizeof sc);
        }
        const int zp = w->zero_points ? blk[zoff + lane] : w->bits == 4 ? 8 : 128;
        float *yb = y + (size_t)b * bs;
        for (size_t j = 0; j < subs; j++) {
            const uint8_t *q = blk + (j * EA_QROWS + (size_t)r) * 16;
            if (w->bits == 8)
                for (int i = 0; i < 16; i++) yb[j * 16 + i] = (float)(q[i] - zp) * sc;
            else
                for (int i = 0; i < 16; i++) {
                    yb[j * 32 + 2 * i] = (float)((q[i] & 15) - zp) * sc;
                    yb[j * 32 + 2 * i + 1] = (float)((q[i] >> 4) - zp) * sc;
                }
        }
    }
}

static void row_from_file(const ea_qweight *w, int n, float *y) {
    const int bs = w->block_size, nb = w->n_blocks;
    const uint8_t *q = w->data + (size_t)n * nb * (bs * w->bits / 8);
    for (int b = 0; b < nb; b++) {
        const float sc = w->scales[(size_t)n * nb + b];
        const int zp = ea_qweight_zp(w, n, b);
        for (int i = 0; i < bs; i++) {
            const int k = b * bs + i;
            const int v = w->bits == 8 ? q[k] : (k & 1) ? q[k / 2] >> 4 : q[k / 2] & 15;
            y[k] = (float)(v - zp) * sc;
        }
    }
}

static int run(ea_exec *x) {
    const step *st = x->st;
    ea_session *ss = x->ss;
    for (int r = 0; r < x->S; r++)
        if (ss->ids[r] < 0 || ss->ids[r] >= st->vocab) return EA_KERR_ARG;
    const step *head = repack_of(ss->m, st);
    for (int r = 0; r < x->S; r++) {
        float *y = x->y + (size_t)r * st->N;
        if (head) row_from_repack(&head->qw, (int)ss->ids[r], y);
        else row_from_file(&st->qw, (int)ss->ids[r], y);
    }
    const ea_qweight *w = head ? &head->qw : &st->qw;
    const ea_qbytes qb = ea_qweight_file_bytes(1, (size_t)w->n_blocks, w->block_size, w->bits);
    x->bytes = (uint64_t)x->S * (head ? (uint64_t)w->n_blocks * (qb.data / w->n_blocks +
                                                                  ea_qpack_scale_size(w->packed_f16) +
                                                                  (w->zero_points ? 1 : 0))
                                      : qb.data + qb.scales + qb.zero_points);
    return EA_KOK;
}

const ea_op ea_op_gather_bq = {"com.microsoft", "GatherBlockQuantized", plan, run, 0};
