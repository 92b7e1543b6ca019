/* ai.edgeact.Steer after a layer: y = h - (h A^T) A + add, with the session's vectors for
 * its layer, else the folder's defaults (initializers; skipped when all zero). */
#include <math.h>
#include <string.h>

#include "../sparse/sparse.h"
#include "../weights.h"
#include "ops.h"

static int plan(ea_planner *b, const onnx_node *nd, step *st) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    static const char *const known[] = {NULL};
    if (ea_check_attrs(b, nd, known) || ea_get_input(b, nd, 0, 1, &st->in[0]) || ea_get_input(b, nd, 1, 1, &st->in[1]) ||
        ea_get_input(b, nd, 2, 1, &st->in[2]) || ea_need_act(b, nd, 0, st->in[0]) || ea_only_outputs(b, nd, 1))
        return -1;
    int width = m->values[st->in[0]].width;
    const onnx_tensor *add = ea_need_const(b, nd, 1, st->in[1], ONNX_FLOAT, 1);
    const onnx_tensor *abl = add ? ea_need_const(b, nd, 2, st->in[2], ONNX_FLOAT, 2) : NULL;
    if (!abl) return -1;
    if (add->dims[0] != width || abl->dims[1] != width || abl->dims[0] < 1)
        NODE_FAIL("add '%s' must be [%d] and ablate '%s' [R >= 1, %d]", add->name, width, abl->name, width);
    int layer;
    if (ea_op_layer(b, nd, si, OP_STEER, add->name, "steer.%d.add%c", m->n_steer, &layer)) return -1;
    st->op = OP_STEER;
    st->layer = layer;
    st->def_add = (const float *)add->data;
    st->def_ablate = (const float *)abl->data;
    st->def_R = (int)abl->dims[0];
    st->def_add_zero = st->def_ablate_zero = 1;
    for (int k = 0; k < width; k++) st->def_add_zero &= st->def_add[k] == 0.0f;
    for (int k = 0; k < st->def_R * width; k++) st->def_ablate_zero &= st->def_ablate[k] == 0.0f;
    m->n_steer++;
    st->out = ea_add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
    return st->out < 0 ? -1 : 0;
}

static void steer_rows(const ea_session *ss, const step *st, float *h, int S, int width) {
    const float *add = ss->steer_add[st->layer], *abl = ss->steer_ablate[st->layer];
    int R = ss->steer_R[st->layer];
    if (!add && !st->def_add_zero) add = st->def_add;
    if (!abl && !st->def_ablate_zero) abl = st->def_ablate, R = st->def_R;
    for (int s = 0; s < S; s++) {
        float *x = h + (size_t)s * width;
        if (abl) { /* y = h - (h A^T) A: coefficients from the unmodified row */
            for (int r = 0; r < R; r++) {
                const float *a = abl + (size_t)r * width;
                float c = 0.0f;
                for (int k = 0; k < width; k++) c += x[k] * a[k];
                ss->coef[r] = c;
            }
            for (int r = 0; r < R; r++) {
                const float *a = abl + (size_t)r * width;
                const float c = ss->coef[r];
                for (int k = 0; k < width; k++) x[k] -= c * a[k];
            }
        }
        if (add)
            for (int k = 0; k < width; k++) x[k] += add[k];
    }
}

static int run(ea_exec *x) {
    const step *st = x->st;
    ea_session *ss = x->ss;
    if (!st->inplace) memcpy(x->y, x->a, x->n * sizeof(float));
    if (ss->steer_add[st->layer] || ss->steer_ablate[st->layer] || !st->def_add_zero || !st->def_ablate_zero)
        steer_rows(ss, st, x->y, x->S, x->w);
    return EA_KOK;
}

const ea_op ea_op_steer = {"ai.edgeact", "Steer", plan, run, 1};
