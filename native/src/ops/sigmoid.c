/* Sigmoid. Inside a SiLU it is fused away (passes.c); this runs a lone one. */
#include <math.h>
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_need_act(b, nd, 0, st->in[0]) ||
        ea_only_outputs(b, nd, 1))
        return -1;
    st->op = OP_SIGMOID;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, m->values[st->in[0]].width, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    for (size_t i = 0; i < x->n; i++) x->y[i] = 1.0f / (1.0f + expf(-x->a[i]));
    return EA_KOK;
}

const ea_op ea_op_sigmoid = {"", "Sigmoid", plan, run, 1};
