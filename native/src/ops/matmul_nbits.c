/* com.microsoft.MatMulNBits: blockwise int4/int8 weights. accuracy_level 4 rounds the
 * activations to int8 per block (the SIMD repack, ea_qmatmul); below 4 the product is float
 * (ea_qmatmul_f32act on the file layout). Behind a Sparsify, CoreInfer mask or CATS gate the
 * rows may take a sparse path: sparse/ decides and runs it, with the same bits. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../sparse/sparse.h"
#include "../weights.h"
#include "ops.h"

/* float32 x rounded half away from zero to `bits` significant bits */
static float round_significand(float x, int bits) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    const int drop = 24 - bits;
    u = (u + (1u << (drop - 1))) & ~((1u << drop) - 1u);
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Float zero points (MatMulNBits zero points of the scales' type; 4-bit, as onnxruntime's CPU
 * kernel): each block's minimum m = -zp*scale, rounded to 11 (fp16) or 17 significant bits when
 * every minimum of the weight is within one float32 ulp of such a value (converters/quantize.py's
 * block_minimums, the numpy reference). The kernels take them as the weight's minimums
 * (st->qmin, [N, n_blocks], until the repack holds them): codes with zero point 0, plus the
 * minimum times the block's sum. */
static int float_minimums(ea_planner *b, const onnx_node *nd, step *st, const onnx_tensor *Z, const float *scales,
                          int N, int nb, int bits) {
    if (bits != 4) NODE_FAIL("float zero_points '%s' need bits 4 (onnxruntime has none for 8-bit)", Z->name);
    if ((int64_t)ea_numel(Z) != (int64_t)N * nb)
        NODE_FAIL("float zero_points '%s' has %d elements, expected N x blocks = %lld", Z->name, ea_numel(Z),
                  (long long)N * nb);
    const float *zf = (const float *)Z->data;
    const size_t n = (size_t)N * nb;
    st->qmin = malloc(n * sizeof(float));
    if (!st->qmin) NODE_FAIL("out of memory for the block minimums");
    int keep = 0; /* significant bits kept: 0 = all */
    static const int choices[2] = {11, 17};
    for (int c = 0; c < 2 && !keep; c++) {
        int ok = 1;
        for (size_t i = 0; i < n && ok; i++) {
            const float mn = -(zf[i] * scales[i]);
            if (!isfinite(mn)) NODE_FAIL("float zero_points '%s' give a non-finite minimum at %zu", Z->name, i);
            const float r = round_significand(mn, choices[c]);
            ok = fabsf(r - mn) <= nextafterf(fabsf(mn), INFINITY) - fabsf(mn);
        }
        if (ok) keep = choices[c];
    }
    for (size_t i = 0; i < n; i++) {
        const float mn = -(zf[i] * scales[i]);
        st->qmin[i] = keep ? round_significand(mn, keep) : mn;
    }
    return 0;
}

static void release_file_pages(void *m, const void *p, size_t n) { ea_release_pages(m, p, n); }

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"K", "N", "bits", "block_size", "accuracy_level", NULL};
    int64_t K = 0, N = 0, bits = 4, bs = 0, acc = 4;
    if (ea_check_attrs(b, nd, known) || ea_attr_int(b, nd, "K", 0, 1, &K) || ea_attr_int(b, nd, "N", 0, 1, &N) ||
        ea_attr_int(b, nd, "bits", 4, 0, &bits) || ea_attr_int(b, nd, "block_size", 0, 1, &bs) ||
        ea_attr_int(b, nd, "accuracy_level", 4, 0, &acc))
        return -1;
    if (ea_check_dim(b, nd, K, "attribute K") || ea_check_dim(b, nd, N, "attribute N")) return -1;
    if (bits != 4 && bits != 8) NODE_FAIL("bits %lld is not supported (4 or 8)", (long long)bits);
    if (bs != 32 && bs != 64 && bs != 128) NODE_FAIL("block_size %lld is not supported (32, 64 or 128)", (long long)bs);
    if (acc < 0 || acc > 4) NODE_FAIL("accuracy_level %lld is out of range 0..4", (long long)acc);
    for (int k = 4; k < nd->n_inputs; k++)
        if (*nd->inputs[k]) NODE_FAIL("input %d ('%s': g_idx/bias) is not supported", k, nd->inputs[k]);
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_get_input(b, nd, 2, 1, &st->in[2]) || ea_need_act(b, nd, 0, st->in[0]))
        return -1;
    int zpv;
    if (ea_get_input(b, nd, 3, 0, &zpv)) return -1;
    const int nb = (int)((K + bs - 1) / bs);
    const onnx_tensor *B = ea_need_const(b, nd, 1, st->in[1], ONNX_UINT8, -1);
    const onnx_tensor *S = B ? ea_need_const(b, nd, 2, st->in[2], ONNX_FLOAT, -1) : NULL;
    if (!S) return -1;
    const int64_t want_b = N * nb * (bs * bits / 8);
    if (B->ndim != 3 || B->dims[0] != N || B->dims[1] != nb || B->dims[2] != bs * bits / 8)
        NODE_FAIL("B '%s' must be uint8 [N=%lld, blocks=%d, %lld] for K=%lld, bits=%lld, block_size=%lld", B->name,
                  (long long)N, nb, (long long)(bs * bits / 8), (long long)K, (long long)bits, (long long)bs);
    if (ea_numel(S) != N * nb)
        NODE_FAIL("scales '%s' has %d elements, expected N x blocks = %lld", S->name, ea_numel(S),
                  (long long)(N * nb));
    const uint8_t *zp = NULL;
    size_t zp_bytes = 0;
    const onnx_tensor *zfloat = NULL; /* read once here: the minimums are copied */
    if (zpv >= 0) {
        const onnx_tensor *Z = ea_need_const(b, nd, 3, zpv, 0, -1);
        if (!Z) return -1;
        if (Z->dtype == ONNX_FLOAT) {
            if (float_minimums(b, nd, st, Z, (const float *)S->data, (int)N, nb, (int)bits)) return -1;
            zfloat = Z;
        } else {
            if (Z->dtype != ONNX_UINT8)
                NODE_FAIL("zero_points '%s' must be uint8 or float32 (the scales' type)", Z->name);
            const int64_t want = (int64_t)ea_qweight_file_bytes((size_t)N, (size_t)nb, (int)bs, (int)bits).zero_points;
            if (ea_numel(Z) != want)
                NODE_FAIL("zero_points '%s' has %d elements, expected %lld", Z->name, ea_numel(Z), (long long)want);
            zp = Z->data;
            zp_bytes = Z->nbytes;
        }
    }
    if (m->values[st->in[0]].width != K)
        NODE_FAIL("input width %d does not match attribute K=%lld", m->values[st->in[0]].width, (long long)K);
    /* accuracy_level 4 lets activations be rounded to int8 (the fast SIMD path); below it the
     * file asks for float activations, computed from the file layout in place */
    st->f32act = acc < 4;
    const ea_isa isa = st->f32act ? EA_ISA_SCALAR : m->isa;
    int rc = st->qmin ? ea_qweight_init_min(&st->qw, isa, (int)K, (int)N, (int)bits, (int)bs, B->data,
                                            (const float *)S->data, st->qmin)
                      : ea_qweight_init_releasing(&st->qw, isa, (int)K, (int)N, (int)bits, (int)bs, B->data,
                                                  (const float *)S->data, zp, release_file_pages, m);
    if (rc) NODE_FAIL("cannot prepare the weight: %s", ea_kernels_strerror(rc));
    st->qw_ready = 1;
    m->bytes_repacked += st->qw.packed_bytes;
    if (st->qw.packed) { /* the SIMD kernels read only the repack from here on */
        ea_release_pages(m, B->data, B->nbytes);
        ea_release_pages(m, S->data, S->nbytes);
        if (zp) ea_release_pages(m, zp, zp_bytes);
        free(st->qmin); /* as large as the scales, and read by no kernel of this model */
        st->qmin = NULL;
        st->qw.minimums = NULL;
    }
    if (zfloat) ea_release_pages(m, zfloat->data, zfloat->nbytes);
    st->op = OP_QMATMUL;
    st->K = (int)K;
    st->N = (int)N;
    /* float minimums: as a call reads them (fp16 in a repack that found them exact) */
    const uint64_t min_bytes = zfloat ? (uint64_t)N * nb * (st->qw.packed_min_f16 ? 2 : sizeof(float)) : 0;
    st->weight_bytes = (uint64_t)want_b + S->nbytes + zp_bytes + min_bytes;
    if (ea_only_outputs(b, nd, 1)) return -1;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, st->N, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    const step *st = x->st;
    const float *a = x->a;
    if (x->last_only) { /* decode needs one row of the vocabulary projection */
        a += (size_t)(x->S - 1) * st->K;
        x->rows = 1;
    }
    int rc;
    if ((st->sparse_src || st->row_src || st->rowsel_src) && ea_sparse_matmul(x, a, &rc)) return rc;
    return (st->f32act ? ea_qmatmul_f32act : ea_qmatmul)(&x->ss->kctx, &st->qw, a, x->rows, x->y);
}

const ea_op ea_op_matmul_nbits = {"com.microsoft", "MatMulNBits", plan, run, 0};
