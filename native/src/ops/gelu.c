/* Gelu with approximate="tanh" (Gemma's gelu_pytorch_tanh):
 * y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), ea_gelu_tanh. The exact (erf) form is
 * refused: no model written by our converters uses it. */
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"approximate", NULL};
    if (ea_check_attrs(b, nd, known)) return -1;
    const onnx_attr *a = onnx_attr_find(nd, "approximate");
    if (!a || a->type != ATTR_STRING || !a->s || strcmp(a->s, "tanh"))
        NODE_FAIL("only approximate=\"tanh\" is supported (got %s)", a && a->s ? a->s : "none");
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_need_act(b, nd, 0, st->in[0]) || ea_only_outputs(b, nd, 1))
        return -1;
    st->op = OP_GELU;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, m->values[st->in[0]].width, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    ea_gelu_tanh(&x->ss->kctx, x->a, x->n, x->y);
    return EA_KOK;
}

const ea_op ea_op_gelu = {"", "Gelu", plan, run, 1};
