/* RMSNormalization over the last axis (float32 stash). */
#include <math.h>
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"axis", "epsilon", "stash_type", NULL};
    int64_t axis = -1, stash = 1;
    if (ea_check_attrs(b, nd, known) || ea_attr_int(b, nd, "axis", -1, 0, &axis) ||
        ea_attr_int(b, nd, "stash_type", 1, 0, &stash) || ea_attr_float(b, nd, "epsilon", 1e-5f, &st->eps))
        return -1;
    if (axis != -1 && axis != 2) NODE_FAIL("axis %lld is not supported (normalize the last axis)", (long long)axis);
    if (stash != 1) NODE_FAIL("stash_type %lld is not supported (float32)", (long long)stash);
    if (!(st->eps >= 0)) NODE_FAIL("epsilon must be non-negative");
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) || ea_need_act(b, nd, 0, st->in[0]))
        return -1;
    const onnx_tensor *t = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
    if (!t) return -1;
    int width = m->values[st->in[0]].width;
    if (ea_numel(t) != width) NODE_FAIL("scale '%s' has %d elements, input width is %d", t->name, ea_numel(t), width);
    st->op = OP_RMSNORM;
    st->w = (const float *)t->data;
    st->weight_bytes = t->nbytes;
    if (ea_only_outputs(b, nd, 1)) return -1;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    ea_rmsnorm(&x->ss->kctx, x->a, x->st->w, x->S, x->w, x->st->eps, x->y);
    return EA_KOK;
}

const ea_op ea_op_rmsnorm = {"", "RMSNormalization", plan, run, 1};
