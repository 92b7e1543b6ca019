/* MatMul of an activation by a float32 weight [K, N] (or float16 through a Cast). */
#include <math.h>
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    value *V;
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_need_act(b, nd, 0, st->in[0]))
        return -1;
    const onnx_tensor *t = ea_need_const(b, nd, 1, st->in[1], 0, 2);
    if (!t) return -1;
    V = &m->values[st->in[1]];
    if (t->dtype != ONNX_FLOAT && !(V->cast_f16 && t->dtype == ONNX_FLOAT16))
        NODE_FAIL("weight '%s' is %s (float32, or float16 through Cast)", t->name, onnx_dtype_name(t->dtype));
    st->K = (int)t->dims[0];
    st->N = (int)t->dims[1];
    if (ea_check_dim(b, nd, t->dims[0], "K") || ea_check_dim(b, nd, t->dims[1], "N")) return -1;
    if (m->values[st->in[0]].width != st->K)
        NODE_FAIL("input width %d does not match weight '%s' [%d, %d]", m->values[st->in[0]].width, t->name, st->K,
                  st->N);
    st->op = OP_MATMUL;
    if (t->dtype == ONNX_FLOAT16) st->Wh = (const uint16_t *)t->data;
    else st->Wf = (const float *)t->data;
    st->weight_bytes = t->nbytes;
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
    return st->Wh ? ea_matmul_f16(&x->ss->kctx, a, x->rows, st->K, st->Wh, st->N, x->y)
                  : ea_matmul_f32(&x->ss->kctx, a, x->rows, st->K, st->Wf, st->N, x->y);
}

const ea_op ea_op_matmul = {"", "MatMul", plan, run, 0};
