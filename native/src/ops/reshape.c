/* Reshape of an initializer: no step (OP_NOP); the output is the same tensor, which its
 * consumer (GatherBlockQuantized over lm_head's table) reads by element count, so the view
 * costs nothing. Reshape of an activation is not needed by the graphs we run. */
#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {"allowzero", NULL};
    int64_t allowzero = 0;
    if (ea_check_attrs(b, nd, known) || ea_attr_int(b, nd, "allowzero", 0, 0, &allowzero)) return -1;
    if (ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) || ea_only_outputs(b, nd, 1))
        return -1;
    const value *V = &m->values[st->in[0]];
    if (V->kind != V_CONST || !V->tensor || V->cast_f16)
        NODE_FAIL("only a reshape of an initializer is supported ('%s' is computed)", V->name);
    const onnx_tensor *shape = ea_need_const(b, nd, 1, st->in[1], ONNX_INT64, 1);
    if (!shape) return -1;
    const onnx_tensor *t = V->tensor;
    const int64_t *d = (const int64_t *)shape->data;
    int64_t known_n = 1, total = ea_numel(t);
    int free_dim = -1;
    if (total < 0) NODE_FAIL("initializer '%s' is too large", t->name);
    for (int i = 0; i < (int)shape->dims[0]; i++) {
        int64_t v = d[i];
        if (v == 0 && !allowzero && i < t->ndim) v = t->dims[i];
        if (v == -1 && free_dim < 0) free_dim = i;
        else if (v < 1) NODE_FAIL("shape entry %lld is not supported", (long long)d[i]);
        else known_n *= v;
    }
    if (free_dim >= 0 ? total % known_n : known_n != total)
        NODE_FAIL("cannot reshape '%s' (%lld elements) to the given shape", t->name, (long long)total);
    st->op = OP_NOP;
    st->out = ea_add_output(b, nd, 0, V_CONST, t->dtype, 0, si);
    if (st->out < 0) return -1;
    m->values[st->out].tensor = V->tensor;
    return 0;
}

static int run(ea_exec *x) {
    (void)x;
    return EA_KOK;
}

const ea_op ea_op_reshape = {"", "Reshape", plan, run, 0};
