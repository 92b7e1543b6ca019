/* ai.edgeact.HeadRMSNorm(x, w) epsilon: RMSNormalization of each head of x (rows of w's
 * length) scaled by w; Gemma 3's and Qwen3's q/k norm, before GroupQueryAttention rotates. */
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"epsilon", NULL};
    if (ea_check_attrs(b, nd, known) || ea_attr_float(b, nd, "epsilon", 1e-5f, &st->eps)) return -1;
    if (!(st->eps >= 0)) NODE_FAIL("epsilon must be non-negative");
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_need_act(b, nd, 0, st->in[0]) || ea_only_outputs(b, nd, 1))
        return -1;
    const onnx_tensor *t = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, 1);
    if (!t) return -1;
    const int width = m->values[st->in[0]].width, D = ea_numel(t);
    if (D < 1 || width % D) NODE_FAIL("input width %d is not a whole number of heads of %d", width, D);
    st->op = OP_HEAD_RMSNORM;
    st->w = (const float *)t->data;
    st->D = D;
    st->weight_bytes = t->nbytes;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    ea_rmsnorm(&x->ss->kctx, x->a, x->st->w, (int)(x->n / (size_t)x->st->D), x->st->D, x->st->eps, x->y);
    return EA_KOK;
}

const ea_op ea_op_head_rmsnorm = {"ai.edgeact", "HeadRMSNorm", plan, run, 1};
