/* Cast to float32. Of an activation: a copy (activations are float32 storage already), or
 * nothing in place. Of a float16 initializer: no step at all (OP_NOP); the consumer reads the
 * float16 weight itself. */
#include <math.h>
#include <string.h>

#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    value *V;
    static const char *const known[] = {"to", "saturate", "round_mode", NULL};
    int64_t to = 0;
    if (ea_check_attrs(b, nd, known) || ea_attr_int(b, nd, "to", 0, 1, &to)) return -1;
    if (to != ONNX_FLOAT) NODE_FAIL("cast to type %lld is not supported (only to float32)", (long long)to);
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_only_outputs(b, nd, 1)) return -1;
    V = &m->values[st->in[0]];
    if (V->kind == V_CONST) {
        if (!V->tensor || (V->tensor->dtype != ONNX_FLOAT && V->tensor->dtype != ONNX_FLOAT16))
            NODE_FAIL("cast of initializer '%s' of type %s is not supported", V->name,
                      V->tensor ? onnx_dtype_name(V->tensor->dtype) : "?");
        onnx_tensor *t = V->tensor;
        st->op = OP_NOP; /* the consumer reads the fp16 weight itself */
        st->out = ea_add_output(b, nd, 0, V_CONST, ONNX_FLOAT, 0, si);
        if (st->out < 0) return -1;
        m->values[st->out].tensor = t;
        m->values[st->out].cast_f16 = t->dtype == ONNX_FLOAT16;
        return 0;
    }
    if (ea_need_act(b, nd, 0, st->in[0])) return -1;
    st->op = OP_CAST; /* activations are float32 storage already: a copy or nothing */
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, m->values[st->in[0]].width, si);
    return st->out < 0 ? -1 : 0;
}

static int run(ea_exec *x) {
    if (!x->st->inplace) memcpy(x->y, x->a, x->n * sizeof(float));
    return EA_KOK;
}

const ea_op ea_op_cast = {"", "Cast", plan, run, 1};
