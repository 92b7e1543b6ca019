/* Graph validation against docs/model-folder.md and the execution plan:
 * every node checked (op set, attributes, operand kinds, widths, weight
 * shapes), weights bound, Sigmoid/Mul/Mul fused into SiLU·mul, and
 * activation buffers assigned to slots by liveness. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "weights.h"

/* ---- name → value index (open addressing) ------------------------------- */
typedef struct {
    int cap;
    int *idx;
    const value *vals;
} name_map;

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull;
    return h;
}
static int map_find(const name_map *nm, const char *name) {
    for (uint64_t h = hash_str(name) & (uint64_t)(nm->cap - 1);; h = (h + 1) & (uint64_t)(nm->cap - 1)) {
        int i = nm->idx[h];
        if (i < 0) return -1;
        if (!strcmp(nm->vals[i].name, name)) return i;
    }
}
static void map_put(name_map *nm, const char *name, int index) {
    uint64_t h = hash_str(name) & (uint64_t)(nm->cap - 1);
    while (nm->idx[h] >= 0) h = (h + 1) & (uint64_t)(nm->cap - 1);
    nm->idx[h] = index;
}

typedef struct {
    ea_model *m;
    name_map nm;
    int cap_values;
    ea_err *err;
} builder;

static int new_value(builder *b, const char *name, value_kind kind, int dtype, int width) {
    ea_model *m = b->m;
    value *v = ea_push((void **)&m->values, &m->n_values, &b->cap_values, sizeof(value));
    if (!v) return -1;
    b->nm.vals = m->values;
    v->name = name;
    v->kind = kind;
    v->dtype = dtype;
    v->width = width;
    v->producer = -1;
    v->last_use = -1;
    v->slot = -1;
    v->hidden_layer = -1;
    int layer;
    char tail;
    if (sscanf(name, "hidden.%d%c", &layer, &tail) == 1 && layer >= 0) v->hidden_layer = layer;
    map_put(&b->nm, name, m->n_values - 1);
    return m->n_values - 1;
}

/* ---- node helpers ---------------------------------------------------------- */
#define NODE_FAIL(...) return node_fail(b, nd, __VA_ARGS__)
static int node_fail(builder *b, const onnx_node *nd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
#include <stdarg.h>
static int node_fail(builder *b, const onnx_node *nd, const char *fmt, ...) {
    char detail[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return ea_fail(b->err, "node '%s' (%s%s%s): %s", nd->name, nd->domain, *nd->domain ? "." : "", nd->op_type, detail);
}

static int attr_int(builder *b, const onnx_node *nd, const char *name, int64_t def, int required, int64_t *out) {
    const onnx_attr *a = onnx_attr_find(nd, name);
    if (!a) {
        if (required) NODE_FAIL("missing attribute %s", name);
        *out = def;
        return 0;
    }
    if (a->type && a->type != ATTR_INT) NODE_FAIL("attribute %s must be an int", name);
    *out = a->i;
    return 0;
}
static int attr_float(builder *b, const onnx_node *nd, const char *name, float def, float *out) {
    const onnx_attr *a = onnx_attr_find(nd, name);
    if (!a) {
        *out = def;
        return 0;
    }
    if (a->type && a->type != ATTR_FLOAT) NODE_FAIL("attribute %s must be a float", name);
    if (!isfinite(a->f)) NODE_FAIL("attribute %s is not finite", name);
    *out = a->f;
    return 0;
}
/* Attributes other than those listed are rejected: silently ignoring one could change results. */
static int check_attrs(builder *b, const onnx_node *nd, const char *const *known) {
    for (int i = 0; i < nd->n_attrs; i++) {
        int ok = 0;
        for (const char *const *k = known; *k; k++) ok |= !strcmp(*k, nd->attrs[i].name);
        if (!ok) NODE_FAIL("attribute '%s' is not supported", nd->attrs[i].name);
    }
    return 0;
}

static int get_input(builder *b, const onnx_node *nd, int k, int required, int *out) {
    *out = -1;
    if (k >= nd->n_inputs || !*nd->inputs[k]) {
        if (required) NODE_FAIL("input %d is missing", k);
        return 0;
    }
    int v = map_find(&b->nm, nd->inputs[k]);
    if (v < 0) {
        const onnx_model *om = &b->m->onnx;
        for (int j = 0; j < om->n_nodes; j++)
            for (int o = 0; o < om->nodes[j].n_outputs; o++)
                if (!strcmp(om->nodes[j].outputs[o], nd->inputs[k]))
                    NODE_FAIL("input '%s' is produced by node '%s' which does not come earlier "
                              "(nodes out of topological order or a cycle)", nd->inputs[k], om->nodes[j].name);
        NODE_FAIL("input '%s' is dangling: no node, initializer or graph input produces it", nd->inputs[k]);
    }
    *out = v;
    return 0;
}

/* The layer a per-layer op (Steer, NeuronMask) serves: the number its initializer's name carries
 * (fmt, e.g. "steer.%d.add%c"), else its order among that op's nodes. Two nodes of one op may
 * not serve the same layer. */
static int op_layer(builder *b, const onnx_node *nd, int si, op_kind op, const char *init_name, const char *fmt,
                    int order, int *layer) {
    char tail;
    if (sscanf(init_name, fmt, layer, &tail) != 1 || *layer < 0) *layer = order;
    for (int j = 0; j < si; j++)
        if (b->m->steps[j].op == op && b->m->steps[j].layer == *layer)
            NODE_FAIL("a second %s node for layer %d", nd->op_type, *layer);
    return 0;
}

static int need_act(builder *b, const onnx_node *nd, int k, int v) {
    if (b->m->values[v].kind != V_ACT)
        NODE_FAIL("input %d '%s' must be a computed activation", k, b->m->values[v].name);
    return 0;
}

static const onnx_tensor *need_const(builder *b, const onnx_node *nd, int k, int v, int dtype, int ndim) {
    const value *val = &b->m->values[v];
    if (val->kind != V_CONST || !val->tensor) {
        node_fail(b, nd, "input %d '%s' must be an initializer", k, val->name);
        return NULL;
    }
    const onnx_tensor *t = val->tensor;
    int dt = val->cast_f16 ? ONNX_FLOAT16 : t->dtype;
    if (dtype && dt != dtype) {
        node_fail(b, nd, "initializer '%s' is %s, expected %s", t->name, onnx_dtype_name(dt), onnx_dtype_name(dtype));
        return NULL;
    }
    if (ndim >= 0 && t->ndim != ndim) {
        node_fail(b, nd, "initializer '%s' has %d dims, expected %d", t->name, t->ndim, ndim);
        return NULL;
    }
    return t;
}

static int numel_of(const onnx_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->dims[i]; /* bounded by ea_resolve_tensors */
    return n > INT32_MAX ? -1 : (int)n;
}

static int check_dim(builder *b, const onnx_node *nd, int64_t d, const char *what) {
    if (d <= 0 || d > (1 << 24)) NODE_FAIL("%s %lld is out of range", what, (long long)d);
    return 0;
}

static int add_output(builder *b, const onnx_node *nd, int k, value_kind kind, int dtype, int width, int step) {
    if (k >= nd->n_outputs || !*nd->outputs[k]) NODE_FAIL("output %d is missing", k);
    const char *name = nd->outputs[k];
    if (map_find(&b->nm, name) >= 0) NODE_FAIL("output '%s' is already defined earlier in the graph", name);
    int v = new_value(b, name, kind, dtype, width);
    if (v < 0) return ea_fail(b->err, "out of memory");
    b->m->values[v].producer = step;
    return v;
}

static int only_outputs(builder *b, const onnx_node *nd, int n) {
    for (int k = n; k < nd->n_outputs; k++)
        if (*nd->outputs[k]) NODE_FAIL("optional output %d ('%s') is not supported", k, nd->outputs[k]);
    return 0;
}

/* ---- one node → one step ----------------------------------------------------- */
static int plan_node(builder *b, int ni, step *st) {
    ea_model *m = b->m;
    const onnx_node *nd = &m->onnx.nodes[ni];
    const char *op = nd->op_type, *dom = nd->domain;
    int std = !*dom || !strcmp(dom, "ai.onnx"), ms = !strcmp(dom, "com.microsoft"), ea = !strcmp(dom, "ai.edgeact");
    int si = (int)(st - m->steps);
    value *V;
    st->node = ni;
    st->name = nd->name;
    st->op_type = nd->op_type;
    st->in[0] = st->in[1] = st->in[2] = -1;
    st->out = -1;
    st->layer = -1;

    if (std && !strcmp(op, "Gather")) {
        static const char *const known[] = {"axis", NULL};
        int64_t axis = 0;
        if (check_attrs(b, nd, known) || attr_int(b, nd, "axis", 0, 0, &axis)) return -1;
        if (axis != 0) NODE_FAIL("axis %lld is not supported (only 0)", (long long)axis);
        if (get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1])) return -1;
        const onnx_tensor *t = need_const(b, nd, 0, st->in[0], 0, 2);
        if (!t) return -1;
        if (t->dtype != ONNX_FLOAT && t->dtype != ONNX_FLOAT16)
            NODE_FAIL("table '%s' is %s (float32 or float16 expected)", t->name, onnx_dtype_name(t->dtype));
        if (m->values[st->in[1]].kind != V_IDS) NODE_FAIL("indices must be the graph input input_ids");
        if (check_dim(b, nd, t->dims[0], "vocabulary size") || check_dim(b, nd, t->dims[1], "embedding width"))
            return -1;
        st->op = OP_GATHER;
        st->table = t->data;
        st->table_f16 = t->dtype == ONNX_FLOAT16;
        st->vocab = (int)t->dims[0];
        st->N = (int)t->dims[1];
        if (m->vocab && m->vocab != st->vocab) NODE_FAIL("a second embedding table with another vocabulary size");
        m->vocab = st->vocab;
        if (only_outputs(b, nd, 1)) return -1;
        st->out = add_output(b, nd, 0, V_ACT, t->dtype, st->N, si);
        return st->out < 0 ? -1 : 0;
    }
    if (std && !strcmp(op, "Cast")) {
        static const char *const known[] = {"to", "saturate", "round_mode", NULL};
        int64_t to = 0;
        if (check_attrs(b, nd, known) || attr_int(b, nd, "to", 0, 1, &to)) return -1;
        if (to != ONNX_FLOAT) NODE_FAIL("cast to type %lld is not supported (only to float32)", (long long)to);
        if (get_input(b, nd, 0, 1, &st->in[0]) || only_outputs(b, nd, 1)) return -1;
        V = &m->values[st->in[0]];
        if (V->kind == V_CONST) {
            if (!V->tensor || (V->tensor->dtype != ONNX_FLOAT && V->tensor->dtype != ONNX_FLOAT16))
                NODE_FAIL("cast of initializer '%s' of type %s is not supported", V->name,
                          V->tensor ? onnx_dtype_name(V->tensor->dtype) : "?");
            onnx_tensor *t = V->tensor;
            st->op = OP_NOP; /* the consumer reads the fp16 weight itself */
            st->out = add_output(b, nd, 0, V_CONST, ONNX_FLOAT, 0, si);
            if (st->out < 0) return -1;
            m->values[st->out].tensor = t;
            m->values[st->out].cast_f16 = t->dtype == ONNX_FLOAT16;
            return 0;
        }
        if (need_act(b, nd, 0, st->in[0])) return -1;
        st->op = OP_CAST; /* activations are float32 storage already: a copy or nothing */
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, m->values[st->in[0]].width, si);
        return st->out < 0 ? -1 : 0;
    }
    if (std && !strcmp(op, "RMSNormalization")) {
        static const char *const known[] = {"axis", "epsilon", "stash_type", NULL};
        int64_t axis = -1, stash = 1;
        if (check_attrs(b, nd, known) || attr_int(b, nd, "axis", -1, 0, &axis) ||
            attr_int(b, nd, "stash_type", 1, 0, &stash) || attr_float(b, nd, "epsilon", 1e-5f, &st->eps))
            return -1;
        if (axis != -1 && axis != 2) NODE_FAIL("axis %lld is not supported (normalize the last axis)", (long long)axis);
        if (stash != 1) NODE_FAIL("stash_type %lld is not supported (float32)", (long long)stash);
        if (!(st->eps >= 0)) NODE_FAIL("epsilon must be non-negative");
        if (get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1]) || need_act(b, nd, 0, st->in[0]))
            return -1;
        const onnx_tensor *t = need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
        if (!t) return -1;
        int width = m->values[st->in[0]].width;
        if (numel_of(t) != width) NODE_FAIL("scale '%s' has %d elements, input width is %d", t->name, numel_of(t), width);
        st->op = OP_RMSNORM;
        st->w = (const float *)t->data;
        st->weight_bytes = t->nbytes;
        if (only_outputs(b, nd, 1)) return -1;
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
        return st->out < 0 ? -1 : 0;
    }
    if (std && !strcmp(op, "MatMul")) {
        static const char *const known[] = {NULL};
        if (check_attrs(b, nd, known) || get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1]) ||
            need_act(b, nd, 0, st->in[0]))
            return -1;
        const onnx_tensor *t = need_const(b, nd, 1, st->in[1], 0, 2);
        if (!t) return -1;
        V = &m->values[st->in[1]];
        if (t->dtype != ONNX_FLOAT && !(V->cast_f16 && t->dtype == ONNX_FLOAT16))
            NODE_FAIL("weight '%s' is %s (float32, or float16 through Cast)", t->name, onnx_dtype_name(t->dtype));
        st->K = (int)t->dims[0];
        st->N = (int)t->dims[1];
        if (check_dim(b, nd, t->dims[0], "K") || check_dim(b, nd, t->dims[1], "N")) return -1;
        if (m->values[st->in[0]].width != st->K)
            NODE_FAIL("input width %d does not match weight '%s' [%d, %d]", m->values[st->in[0]].width, t->name, st->K,
                      st->N);
        st->op = OP_MATMUL;
        if (t->dtype == ONNX_FLOAT16) st->Wh = (const uint16_t *)t->data;
        else st->Wf = (const float *)t->data;
        st->weight_bytes = t->nbytes;
        if (only_outputs(b, nd, 1)) return -1;
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, st->N, si);
        return st->out < 0 ? -1 : 0;
    }
    if (ms && !strcmp(op, "MatMulNBits")) {
        static const char *const known[] = {"K", "N", "bits", "block_size", "accuracy_level", NULL};
        int64_t K = 0, N = 0, bits = 4, bs = 0, acc = 4;
        if (check_attrs(b, nd, known) || attr_int(b, nd, "K", 0, 1, &K) || attr_int(b, nd, "N", 0, 1, &N) ||
            attr_int(b, nd, "bits", 4, 0, &bits) || attr_int(b, nd, "block_size", 0, 1, &bs) ||
            attr_int(b, nd, "accuracy_level", 4, 0, &acc))
            return -1;
        if (check_dim(b, nd, K, "attribute K") || check_dim(b, nd, N, "attribute N")) return -1;
        if (bits != 4 && bits != 8) NODE_FAIL("bits %lld is not supported (4 or 8)", (long long)bits);
        if (bs != 32 && bs != 64 && bs != 128) NODE_FAIL("block_size %lld is not supported (32, 64 or 128)", (long long)bs);
        if (acc < 0 || acc > 4) NODE_FAIL("accuracy_level %lld is out of range 0..4", (long long)acc);
        for (int k = 4; k < nd->n_inputs; k++)
            if (*nd->inputs[k]) NODE_FAIL("input %d ('%s': g_idx/bias) is not supported", k, nd->inputs[k]);
        if (get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1]) ||
            get_input(b, nd, 2, 1, &st->in[2]) || need_act(b, nd, 0, st->in[0]))
            return -1;
        int zpv;
        if (get_input(b, nd, 3, 0, &zpv)) return -1;
        const int nb = (int)((K + bs - 1) / bs);
        const onnx_tensor *B = need_const(b, nd, 1, st->in[1], ONNX_UINT8, -1);
        const onnx_tensor *S = B ? need_const(b, nd, 2, st->in[2], ONNX_FLOAT, -1) : NULL;
        if (!S) return -1;
        const int64_t want_b = N * nb * (bs * bits / 8);
        if (B->ndim != 3 || B->dims[0] != N || B->dims[1] != nb || B->dims[2] != bs * bits / 8)
            NODE_FAIL("B '%s' must be uint8 [N=%lld, blocks=%d, %lld] for K=%lld, bits=%lld, block_size=%lld", B->name,
                      (long long)N, nb, (long long)(bs * bits / 8), (long long)K, (long long)bits, (long long)bs);
        if (numel_of(S) != N * nb)
            NODE_FAIL("scales '%s' has %d elements, expected N x blocks = %lld", S->name, numel_of(S),
                      (long long)(N * nb));
        const uint8_t *zp = NULL;
        size_t zp_bytes = 0;
        if (zpv >= 0) {
            const onnx_tensor *Z = need_const(b, nd, 3, zpv, ONNX_UINT8, -1);
            if (!Z) return -1;
            const int64_t want = (int64_t)ea_qweight_file_bytes((size_t)N, (size_t)nb, (int)bs, (int)bits).zero_points;
            if (numel_of(Z) != want)
                NODE_FAIL("zero_points '%s' has %d elements, expected %lld", Z->name, numel_of(Z), (long long)want);
            zp = Z->data;
            zp_bytes = Z->nbytes;
        }
        if (m->values[st->in[0]].width != K)
            NODE_FAIL("input width %d does not match attribute K=%lld", m->values[st->in[0]].width, (long long)K);
        /* accuracy_level 4 lets activations be rounded to int8 (the fast SIMD path); below it the
         * file asks for float activations, computed from the file layout in place */
        st->f32act = acc < 4;
        int rc = ea_qweight_init(&st->qw, st->f32act ? EA_ISA_SCALAR : m->isa, (int)K, (int)N, (int)bits, (int)bs,
                                 B->data, (const float *)S->data, zp);
        if (rc) NODE_FAIL("cannot prepare the weight: %s", ea_kernels_strerror(rc));
        st->qw_ready = 1;
        m->bytes_repacked += st->qw.packed_bytes;
        if (st->qw.packed) { /* the SIMD kernels read only the repack from here on */
            ea_release_pages(m, B->data, B->nbytes);
            ea_release_pages(m, S->data, S->nbytes);
            if (zp) ea_release_pages(m, zp, zp_bytes);
        }
        st->op = OP_QMATMUL;
        st->K = (int)K;
        st->N = (int)N;
        st->weight_bytes = (uint64_t)want_b + S->nbytes + zp_bytes;
        if (only_outputs(b, nd, 1)) return -1;
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, st->N, si);
        return st->out < 0 ? -1 : 0;
    }
    if (ms && !strcmp(op, "GroupQueryAttention")) {
        static const char *const known[] = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "scale",
                                            "softcap", "local_window_size", "smooth_softmax", NULL};
        int64_t H = 0, KVH = 0, rot = 0, inter = 0, win = -1, smooth = 0;
        float softcap;
        if (check_attrs(b, nd, known) || attr_int(b, nd, "num_heads", 0, 1, &H) ||
            attr_int(b, nd, "kv_num_heads", 0, 1, &KVH) || attr_int(b, nd, "do_rotary", 0, 0, &rot) ||
            attr_int(b, nd, "rotary_interleaved", 0, 0, &inter) || attr_int(b, nd, "local_window_size", -1, 0, &win) ||
            attr_int(b, nd, "smooth_softmax", 0, 0, &smooth) || attr_float(b, nd, "softcap", 0.0f, &softcap))
            return -1;
        if (check_dim(b, nd, H, "num_heads") || check_dim(b, nd, KVH, "kv_num_heads")) return -1;
        if (H % KVH) NODE_FAIL("num_heads %lld is not a multiple of kv_num_heads %lld", (long long)H, (long long)KVH);
        if (rot != 0 && rot != 1) NODE_FAIL("do_rotary must be 0 or 1");
        if (inter != 0) NODE_FAIL("rotary_interleaved=1 is not supported");
        if (win != -1) NODE_FAIL("local_window_size (sliding window) is not supported");
        if (smooth != 0) NODE_FAIL("smooth_softmax is not supported");
        if (softcap != 0.0f) NODE_FAIL("softcap is not supported");
        for (int k = 9; k < nd->n_inputs; k++)
            if (*nd->inputs[k]) NODE_FAIL("input %d ('%s') is not supported", k, nd->inputs[k]);
        int in[9];
        for (int k = 0; k < 9; k++)
            if (get_input(b, nd, k, k < 7 || rot, &in[k])) return -1;
        for (int k = 0; k < 3; k++)
            if (need_act(b, nd, k, in[k])) return -1;
        if (m->values[in[3]].kind != V_PAST || m->values[in[4]].kind != V_PAST)
            NODE_FAIL("past key/value must be the graph inputs past_key_values.*");
        if (m->values[in[5]].kind != V_POSINFO || m->values[in[6]].kind != V_POSINFO)
            NODE_FAIL("inputs 5 and 6 must be the graph inputs seqlens_k and total_sequence_length");
        const int qw = m->values[in[0]].width;
        if (qw % H) NODE_FAIL("query width %d is not a multiple of num_heads %lld", qw, (long long)H);
        const int D = qw / (int)H;
        if (D % 2) NODE_FAIL("head size %d is odd", D);
        if (m->values[in[1]].width != KVH * D || m->values[in[2]].width != KVH * D)
            NODE_FAIL("key/value widths %d/%d do not match kv_num_heads %lld x head size %d", m->values[in[1]].width,
                      m->values[in[2]].width, (long long)KVH, D);
        for (int k = 3; k < 5; k++) {
            const value *pv = &m->values[in[k]];
            const onnx_value_info *vi = NULL;
            for (int g = 0; g < m->onnx.n_inputs; g++)
                if (!strcmp(m->onnx.inputs[g].name, pv->name)) vi = &m->onnx.inputs[g];
            if (vi && vi->ndim == 4 && ((vi->dims[1] >= 0 && vi->dims[1] != KVH) || (vi->dims[3] >= 0 && vi->dims[3] != D)))
                NODE_FAIL("graph input '%s' shape [1, %lld, P, %lld] does not match kv_num_heads %lld, head size %d",
                          pv->name, (long long)vi->dims[1], (long long)vi->dims[3], (long long)KVH, D);
        }
        st->rotary = (int)rot;
        if (rot) {
            const onnx_tensor *c = need_const(b, nd, 7, in[7], ONNX_FLOAT, 2);
            const onnx_tensor *s = c ? need_const(b, nd, 8, in[8], ONNX_FLOAT, 2) : NULL;
            if (!s) return -1;
            if (c->dims[1] != D / 2 || s->dims[1] != D / 2 || s->dims[0] != c->dims[0] || c->dims[0] < 1)
                NODE_FAIL("cos/sin caches must be [max_context, %d] (head size / 2), got [%lld, %lld] and [%lld, %lld]",
                          D / 2, (long long)c->dims[0], (long long)c->dims[1], (long long)s->dims[0],
                          (long long)s->dims[1]);
            if (c->dims[0] > (1 << 24)) NODE_FAIL("cos/sin caches have too many rows");
            st->cos = (const float *)c->data;
            st->sin = (const float *)s->data;
            st->max_pos = (int)c->dims[0];
        } else {
            st->max_pos = 1 << 20;
        }
        if (attr_float(b, nd, "scale", 1.0f / sqrtf((float)D), &st->scale)) return -1;
        if (st->scale == 0.0f) st->scale = 1.0f / sqrtf((float)D); /* onnxruntime: 0 means default */
        st->op = OP_GQA;
        st->H = (int)H;
        st->KVH = (int)KVH;
        st->D = D;
        st->layer = m->n_gqa++;
        for (int k = 0; k < 3; k++) st->in[k] = in[k];
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, qw, si);
        if (st->out < 0) return -1;
        for (int k = 1; k < 3 && k < nd->n_outputs; k++)
            if (*nd->outputs[k] && add_output(b, nd, k, V_PRESENT, ONNX_FLOAT, 0, si) < 0) return -1;
        if (only_outputs(b, nd, 3)) return -1;
        if (!m->n_heads) {
            m->n_heads = st->H;
            m->n_kv_heads = st->KVH;
            m->head_dim = D;
        }
        if (!m->max_context || st->max_pos < m->max_context) m->max_context = st->max_pos;
        if (qw > m->max_q_width) m->max_q_width = qw;
        if (KVH * D > m->max_kv_width) m->max_kv_width = (int)KVH * D;
        return 0;
    }
    if (std && (!strcmp(op, "Add") || !strcmp(op, "Mul"))) {
        static const char *const known[] = {NULL};
        if (check_attrs(b, nd, known) || get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1]) ||
            only_outputs(b, nd, 1))
            return -1;
        int is_add = op[0] == 'A';
        if (is_add && m->values[st->in[0]].kind == V_CONST) {
            int t = st->in[0];
            st->in[0] = st->in[1];
            st->in[1] = t;
        }
        if (need_act(b, nd, 0, st->in[0])) return -1;
        int width = m->values[st->in[0]].width;
        const value *o = &m->values[st->in[1]];
        if (o->kind == V_ACT) {
            if (o->width != width) NODE_FAIL("operand widths %d and %d differ", width, o->width);
            st->op = is_add ? OP_ADD : OP_MUL;
        } else if (is_add && o->kind == V_CONST) {
            const onnx_tensor *t = need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
            if (!t) return -1;
            if (numel_of(t) != width || t->dims[t->ndim - 1] != width)
                NODE_FAIL("bias '%s' must have %d elements along the last axis", t->name, width);
            st->op = OP_ADD_BIAS;
            st->w = (const float *)t->data;
            st->weight_bytes = t->nbytes;
        } else {
            NODE_FAIL("operand '%s' must be an activation%s", o->name, is_add ? " or a bias initializer" : "");
        }
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
        return st->out < 0 ? -1 : 0;
    }
    if (std && !strcmp(op, "Sigmoid")) {
        static const char *const known[] = {NULL};
        if (check_attrs(b, nd, known) || get_input(b, nd, 0, 1, &st->in[0]) || need_act(b, nd, 0, st->in[0]) ||
            only_outputs(b, nd, 1))
            return -1;
        st->op = OP_SIGMOID;
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, m->values[st->in[0]].width, si);
        return st->out < 0 ? -1 : 0;
    }
    if (ea && !strcmp(op, "Sparsify")) {
        static const char *const known[] = {NULL};
        if (check_attrs(b, nd, known) || get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1]) ||
            get_input(b, nd, 2, 1, &st->in[2]) || need_act(b, nd, 0, st->in[0]) || only_outputs(b, nd, 1))
            return -1;
        int width = m->values[st->in[0]].width;
        const onnx_tensor *thr = need_const(b, nd, 1, st->in[1], ONNX_FLOAT, -1);
        const onnx_tensor *col = thr ? need_const(b, nd, 2, st->in[2], ONNX_FLOAT, -1) : NULL;
        if (!col) return -1;
        if (numel_of(thr) != width || numel_of(col) != width)
            NODE_FAIL("threshold and col_scale must have %d elements (the input width)", width);
        st->op = OP_SPARSIFY;
        st->thr = (const float *)thr->data;
        st->colsc = (const float *)col->data;
        /* TEAL's one threshold and unit scales: the kernel then reads x alone */
        int uniform = width > 0, ones = 1;
        for (int k = 1; k < width && uniform; k++) uniform = st->thr[k] == st->thr[0];
        for (int k = 0; k < width && ones; k++) ones = st->colsc[k] == 1.0f;
        st->thr_step = !uniform;
        if (ones) st->colsc = NULL;
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
        return st->out < 0 ? -1 : 0;
    }
    if (ea && !strcmp(op, "NeuronMask")) {
        static const char *const known[] = {NULL};
        if (check_attrs(b, nd, known) || get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1]) ||
            get_input(b, nd, 2, 1, &st->in[2]) || need_act(b, nd, 0, st->in[0]) || only_outputs(b, nd, 2))
            return -1;
        if (nd->n_outputs < 2 || !*nd->outputs[1]) NODE_FAIL("%s", "needs both outputs (y, score)");
        const int width = m->values[st->in[0]].width;
        const onnx_tensor *mask = need_const(b, nd, 1, st->in[1], ONNX_FLOAT, 1);
        const onnx_tensor *k = mask ? need_const(b, nd, 2, st->in[2], ONNX_INT64, -1) : NULL;
        if (!k) return -1;
        if (mask->dims[0] != width) NODE_FAIL("mask '%s' must have %d elements (the input width)", mask->name, width);
        int64_t kv;
        if (numel_of(k) != 1) NODE_FAIL("k '%s' must hold one value", k->name);
        memcpy(&kv, k->data, sizeof kv);
        if (kv < 1 || kv > width) NODE_FAIL("k = %lld is outside [1, %d]", (long long)kv, width);
        if (m->nmask_width && m->nmask_width != width)
            NODE_FAIL("width %d differs from the other NeuronMask nodes' %d", width, m->nmask_width);
        int layer;
        if (op_layer(b, nd, si, OP_NEURON_MASK, mask->name, "ffn_mask.%d%c", m->n_nmask, &layer)) return -1;
        st->op = OP_NEURON_MASK;
        st->layer = layer;
        st->def_mask = (const float *)mask->data;
        st->token_k = (int)kv;
        m->nmask_width = width;
        m->n_nmask++;
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
        if (st->out < 0 || add_output(b, nd, 1, V_SCORE, ONNX_FLOAT, width, si) < 0) return -1;
        return 0;
    }
    if (ea && !strcmp(op, "Steer")) {
        static const char *const known[] = {NULL};
        if (check_attrs(b, nd, known) || get_input(b, nd, 0, 1, &st->in[0]) || get_input(b, nd, 1, 1, &st->in[1]) ||
            get_input(b, nd, 2, 1, &st->in[2]) || need_act(b, nd, 0, st->in[0]) || only_outputs(b, nd, 1))
            return -1;
        int width = m->values[st->in[0]].width;
        const onnx_tensor *add = need_const(b, nd, 1, st->in[1], ONNX_FLOAT, 1);
        const onnx_tensor *abl = add ? need_const(b, nd, 2, st->in[2], ONNX_FLOAT, 2) : NULL;
        if (!abl) return -1;
        if (add->dims[0] != width || abl->dims[1] != width || abl->dims[0] < 1)
            NODE_FAIL("add '%s' must be [%d] and ablate '%s' [R >= 1, %d]", add->name, width, abl->name, width);
        int layer;
        if (op_layer(b, nd, si, OP_STEER, add->name, "steer.%d.add%c", m->n_steer, &layer)) return -1;
        st->op = OP_STEER;
        st->layer = layer;
        st->def_add = (const float *)add->data;
        st->def_ablate = (const float *)abl->data;
        st->def_R = (int)abl->dims[0];
        st->def_add_zero = st->def_ablate_zero = 1;
        for (int k = 0; k < width; k++) st->def_add_zero &= st->def_add[k] == 0.0f;
        for (int k = 0; k < st->def_R * width; k++) st->def_ablate_zero &= st->def_ablate[k] == 0.0f;
        m->n_steer++;
        st->out = add_output(b, nd, 0, V_ACT, ONNX_FLOAT, width, si);
        return st->out < 0 ? -1 : 0;
    }
    NODE_FAIL("op type '%s%s%s' is not supported by the native runtime (supported: Gather, Cast, RMSNormalization, "
              "MatMul, Add, Mul, Sigmoid, com.microsoft.MatMulNBits, com.microsoft.GroupQueryAttention, "
              "ai.edgeact.Steer, ai.edgeact.Sparsify, ai.edgeact.NeuronMask)", dom, *dom ? "." : "", op);
}

/* ---- graph inputs and initializers -------------------------------------------- */
static int add_graph_inputs(builder *b) {
    ea_model *m = b->m;
    onnx_model *om = &m->onnx;
    m->ids_value = -1;
    for (int i = 0; i < om->n_inits; i++) {
        onnx_tensor *t = &om->inits[i];
        if (map_find(&b->nm, t->name) >= 0) return ea_fail(b->err, "initializer '%s' is defined twice", t->name);
        int v = new_value(b, t->name, V_CONST, t->dtype, 0);
        if (v < 0) return ea_fail(b->err, "out of memory");
        m->values[v].tensor = t;
    }
    for (int i = 0; i < om->n_inputs; i++) {
        const onnx_value_info *vi = &om->inputs[i];
        const char *n = vi->name;
        int existing = map_find(&b->nm, n);
        if (existing >= 0) {
            if (m->values[existing].kind != V_CONST || !m->values[existing].tensor)
                return ea_fail(b->err, "graph input '%s' is declared twice", n);
            /* an initializer that is also a graph input: an overridable default (steer.*) */
            if (vi->elem_type && vi->elem_type != m->values[existing].tensor->dtype)
                return ea_fail(b->err, "graph input '%s' is declared %s but its initializer is %s", n,
                               onnx_dtype_name(vi->elem_type), onnx_dtype_name(m->values[existing].tensor->dtype));
            continue;
        }
        value_kind kind;
        int want;
        if (!strcmp(n, "input_ids")) kind = V_IDS, want = ONNX_INT64;
        else if (!strcmp(n, "seqlens_k") || !strcmp(n, "total_sequence_length")) kind = V_POSINFO, want = ONNX_INT32;
        else if (!strncmp(n, "past_key_values.", 16)) kind = V_PAST, want = ONNX_FLOAT;
        else
            return ea_fail(b->err, "graph input '%s' has no initializer and is not one the runtime feeds "
                                   "(input_ids, seqlens_k, total_sequence_length, past_key_values.*)", n);
        if (vi->elem_type != want)
            return ea_fail(b->err, "graph input '%s' must be %s, the graph declares %s", n, onnx_dtype_name(want),
                           onnx_dtype_name(vi->elem_type));
        int v = new_value(b, n, kind, want, kind == V_IDS ? 1 : 0);
        if (v < 0) return ea_fail(b->err, "out of memory");
        if (kind == V_IDS) m->ids_value = v;
    }
    if (m->ids_value < 0) return ea_fail(b->err, "the graph has no input_ids input");
    return 0;
}

/* ---- fusion and buffer slots ---------------------------------------------------- */
static void count_uses(ea_model *m, int *uses) {
    memset(uses, 0, sizeof(int) * (size_t)m->n_values);
    for (int s = 0; s < m->n_steps; s++)
        for (int k = 0; k < 3; k++)
            if (m->steps[s].op != OP_NOP && m->steps[s].in[k] >= 0) uses[m->steps[s].in[k]]++;
    for (int i = 0; i < m->n_values; i++) uses[i] += m->values[i].is_graph_output;
}

/* Sigmoid(g) → Mul(g, sig) → Mul(·, u) becomes one SiluMul(g, u) when the intermediates have
 * no other use; a Sigmoid(g) → Mul(g, sig) that does not feed one becomes SiLU alone (CATS
 * sparsifies it before the gate·up Mul; as a scalar expf loop it was 2% of a TinyLlama-shape
 * token). */
static void fuse_silu(ea_model *m, int *uses) {
    for (int s = 0; s < m->n_steps; s++) {
        step *sg = &m->steps[s];
        if (sg->op != OP_SIGMOID || uses[sg->out] != 1) continue;
        int g = sg->in[0], m1 = -1, m2 = -1;
        for (int j = s + 1; j < m->n_steps && m1 < 0; j++) {
            step *t = &m->steps[j];
            if (t->op == OP_MUL && ((t->in[0] == g && t->in[1] == sg->out) || (t->in[1] == g && t->in[0] == sg->out)))
                m1 = j;
        }
        if (m1 < 0) continue;
        step *s1 = &m->steps[m1];
        for (int j = m1 + 1; j < m->n_steps && m2 < 0 && uses[s1->out] == 1; j++) {
            step *t = &m->steps[j];
            if (t->op == OP_MUL && (t->in[0] == s1->out || t->in[1] == s1->out)) m2 = j;
        }
        step *t = m2 >= 0 ? &m->steps[m2] : NULL;
        const int u = t ? (t->in[0] == s1->out ? t->in[1] : t->in[0]) : -1;
        if (t && u != s1->out) {
            t->op = OP_SILU_MUL;
            t->op_type = "SiluMul";
            t->in[0] = g;
            t->in[1] = u;
            s1->op = OP_NOP;
        } else {
            s1->op = OP_SILU;
            s1->op_type = "Silu";
            s1->in[0] = g;
            s1->in[1] = -1;
        }
        sg->op = OP_NOP;
    }
    count_uses(m, uses);
}

/* A stacked GEMV may write all its members' outputs when the first one runs if nothing
 * runs between them and their buffers are their own: consecutive steps reading one live
 * input free no slot before the last, so each later member's slot is idle from the first
 * on; distinct slots rule out an unused output whose slot the next member reuses. */
static void mark_direct_fused(ea_model *m) {
    for (int g = 0; g < m->n_fused; g++) {
        fused_gemv *f = &m->fused[g];
        int ok = 1;
        for (int i = 0; i < f->n && ok; i++) {
            const step *st = &m->steps[f->step[i]];
            const value *o = st->out >= 0 ? &m->values[st->out] : NULL;
            /* no CoreInfer kept-rows member: that branch would write its own output */
            ok = f->step[i] == f->step[0] + i && !st->row_src && o && o->kind == V_ACT && o->width == st->qw.N &&
                 o->slot != m->values[st->in[0]].slot;
            for (int k = 0; k < i && ok; k++) ok = o->slot != m->values[m->steps[f->step[k]].out].slot;
        }
        f->direct = ok;
    }
}

/* The file layout of st's weight (rows contiguous) in one allocation of its own, for the
 * output-row kernel: the file's pages were released after the repack, and read back at
 * random through 4 KB pages of the mapping the rows kernel ran at half the dense GEMV's
 * speed (TLB misses, page faults) where the copy runs 1.4x faster at half the rows. */
static int rows_copy(ea_model *m, step *st) {
    const ea_qweight *w = &st->qw;
    if (!w->packed) return 0; /* no repack (scalar isa): the kernels read the file layout anyway */
    const ea_qbytes fb = ea_qweight_file_bytes((size_t)w->N, (size_t)w->n_blocks, w->block_size, w->bits);
    const size_t sb = fb.scales, db = fb.data, zb = w->zero_points ? fb.zero_points : 0;
    uint8_t *buf = ea_alloc_weights(sb + db + zb);
    if (!buf) return -1;
    memcpy(buf, w->scales, sb);
    memcpy(buf + sb, w->data, db);
    if (zb) memcpy(buf + sb + db, w->zero_points, zb);
    if (ea_qweight_init(&st->rows_qw, EA_ISA_SCALAR, w->K, w->N, w->bits, w->block_size, buf + sb, (const float *)buf,
                        zb ? buf + sb + db : NULL)) {
        free(buf);
        return -1;
    }
    st->rows_buf = buf;
    m->bytes_repacked += sb + db + zb;
    /* reading them for the copy mapped the file's pages back in */
    ea_release_pages(m, w->data, db);
    ea_release_pages(m, w->scales, sb);
    if (zb) ea_release_pages(m, w->zero_points, zb);
    return 0;
}

static int assign_slots(ea_model *m, ea_err *err) {
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op == OP_NOP) continue;
        for (int k = 0; k < 3; k++)
            if (st->in[k] >= 0 && m->values[st->in[k]].kind == V_ACT) m->values[st->in[k]].last_use = s;
    }
    for (int i = 0; i < m->n_values; i++) {
        value *v = &m->values[i];
        if (v->kind != V_ACT) continue;
        if (v->is_graph_output) v->last_use = m->n_steps;
        else if (v->last_use < v->producer) v->last_use = v->producer; /* unused: freed right away */
    }
    int cap = 0;
    int *free_slot = calloc((size_t)m->n_values + 1, sizeof(int));
    if (!free_slot) return ea_fail(err, "out of memory");
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op == OP_NOP || st->out < 0 || m->values[st->out].kind != V_ACT) continue;
        value *o = &m->values[st->out];
        value *a = st->in[0] >= 0 ? &m->values[st->in[0]] : NULL;
        int inplace_ok = st->op == OP_CAST || st->op == OP_RMSNORM || st->op == OP_ADD || st->op == OP_ADD_BIAS ||
                         st->op == OP_MUL || st->op == OP_SIGMOID || st->op == OP_SILU_MUL || st->op == OP_SILU ||
                         st->op == OP_STEER;
        if (inplace_ok && a && a->kind == V_ACT && a->last_use == s && !a->is_graph_output && a->width == o->width &&
            st->in[1] != st->in[0]) {
            o->slot = a->slot;
            st->inplace = 1;
        } else {
            int best = -1;
            for (int k = 0; k < m->n_slots; k++)
                if (free_slot[k] && (best < 0 || (m->slot_width[k] >= o->width && m->slot_width[best] < o->width) ||
                                     (m->slot_width[k] >= o->width && m->slot_width[k] < m->slot_width[best])))
                    best = k;
            if (best < 0) {
                if (m->n_slots == cap) {
                    int nc = cap ? cap * 2 : 8;
                    int *w = realloc(m->slot_width, sizeof(int) * (size_t)nc);
                    if (!w) {
                        free(free_slot);
                        return ea_fail(err, "out of memory");
                    }
                    m->slot_width = w;
                    cap = nc;
                }
                best = m->n_slots++;
                m->slot_width[best] = 0;
            }
            free_slot[best] = 0;
            if (m->slot_width[best] < o->width) m->slot_width[best] = o->width;
            o->slot = best;
        }
        /* release what dies here (the output's own slot stays taken) */
        for (int k = 0; k < 3; k++) {
            int vi = st->in[k];
            if (vi < 0 || m->values[vi].kind != V_ACT || m->values[vi].last_use != s) continue;
            if (m->values[vi].slot != o->slot) free_slot[m->values[vi].slot] = 1;
        }
        if (o->last_use == s) free_slot[o->slot] = 1;
    }
    free(free_slot);
    return 0;
}

/* A switch in the environment: set, non-empty and not "0". */
static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

int ea_model_build(ea_model *m, const char *dir, ea_err *err) {
    onnx_model *om = &m->onnx;
    if (ea_resolve_tensors(m, dir, err)) return EA_ERR_FORMAT;
    for (int i = 0; i < om->n_nodes; i++) {
        const char *d = om->nodes[i].domain;
        int found = 0;
        for (int k = 0; k < om->n_opsets; k++)
            found |= !strcmp(om->opsets[k].domain, d) || (!*d && !strcmp(om->opsets[k].domain, "ai.onnx"));
        if (!found)
            return ea_fail(err, "node '%s' (%s): domain '%s' is not in the model's opset_import", om->nodes[i].name,
                           om->nodes[i].op_type, d), EA_ERR_FORMAT;
    }
    builder b = {m, {0, NULL, NULL}, 0, err};
    int total = om->n_inits + om->n_inputs + 1;
    for (int i = 0; i < om->n_nodes; i++) total += om->nodes[i].n_outputs;
    b.nm.cap = 16;
    while (b.nm.cap < 2 * total) b.nm.cap *= 2;
    b.nm.idx = malloc(sizeof(int) * (size_t)b.nm.cap);
    m->steps = calloc((size_t)om->n_nodes + 1, sizeof(step));
    int *uses = NULL;
    int rc = EA_ERR_FORMAT;
    if (!b.nm.idx || !m->steps) {
        ea_fail(err, "out of memory");
        rc = EA_ERR_NOMEM;
        goto done;
    }
    memset(b.nm.idx, 0xff, sizeof(int) * (size_t)b.nm.cap);
    if (add_graph_inputs(&b)) goto done;
    for (int i = 0; i < om->n_nodes; i++) {
        m->n_steps = i + 1;
        if (plan_node(&b, i, &m->steps[i])) goto done;
        const char *ot = om->nodes[i].op_type;
        int k = 0;
        while (k < m->n_op_types && strcmp(m->op_types[k], ot)) k++;
        if (k < 32) {
            if (k == m->n_op_types) m->op_types[m->n_op_types++] = ot;
            m->op_counts[k]++;
        }
    }
    m->logits_value = m->logits_step = -1;
    for (int i = 0; i < om->n_outputs; i++) {
        int v = map_find(&b.nm, om->outputs[i].name);
        if (v < 0) {
            ea_fail(err, "graph output '%s' is not produced by any node", om->outputs[i].name);
            goto done;
        }
        if (m->values[v].kind != V_ACT && m->values[v].kind != V_PRESENT && m->values[v].kind != V_SCORE) {
            ea_fail(err, "graph output '%s' is not computed by the graph", om->outputs[i].name);
            goto done;
        }
        if (m->values[v].kind == V_ACT) m->values[v].is_graph_output = 1;
        if (!strcmp(om->outputs[i].name, "logits")) m->logits_value = v;
    }
    for (int s = 0; s < m->n_steps; s++)
        for (int k = 0; k < 3; k++)
            if (m->steps[s].in[k] >= 0 && m->values[m->steps[s].in[k]].kind == V_PRESENT) {
                ea_fail(err, "node '%s': reading '%s' (a KV-cache output) is not supported", m->steps[s].name,
                        m->values[m->steps[s].in[k]].name);
                goto done;
            }
    if (m->logits_value < 0) {
        ea_fail(err, "the graph has no 'logits' output");
        goto done;
    }
    if (!m->vocab || m->values[m->logits_value].width != m->vocab) {
        ea_fail(err, "logits width %d does not match the embedding vocabulary %d", m->values[m->logits_value].width,
                m->vocab);
        goto done;
    }
    if (!m->n_gqa) {
        ea_fail(err, "the graph has no GroupQueryAttention node");
        goto done;
    }
    m->logits_step = m->values[m->logits_value].producer;
    uses = malloc(sizeof(int) * (size_t)m->n_values);
    if (!uses) {
        ea_fail(err, "out of memory");
        rc = EA_ERR_NOMEM;
        goto done;
    }
    count_uses(m, uses);
    fuse_silu(m, uses);
    /* int4 matmuls fed by a Sparsify get a channel-major copy for the input-sparse GEMV;
     * siblings reading the same input share one, stacked along N */
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op != OP_QMATMUL || st->qw.bits != 4 || st->f32act || st->in[0] < 0) continue;
        int p = m->values[st->in[0]].producer;
        /* CATS: down reads SiLU(gate), sparsified, times up; its zeros are the Sparsify's */
        if (p >= 0 && p < m->n_steps && m->steps[p].op == OP_MUL)
            for (int k = 0, mul = p; k < 2; k++) {
                const int v = m->steps[mul].in[k], q = v >= 0 ? m->values[v].producer : -1;
                if (q >= 0 && q < m->n_steps && m->steps[q].op == OP_SPARSIFY &&
                    m->values[m->steps[q].out].width == m->values[st->in[0]].width)
                    p = q;
            }
        if (p < 0 || p >= m->n_steps || (m->steps[p].op != OP_SPARSIFY && m->steps[p].op != OP_NEURON_MASK)) continue;
        st->sparse_src = p + 1;
    }
    m->sparse_always = env_flag("EDGEACT_SPARSE_ALWAYS");
    m->sparse_static = env_flag("EDGEACT_SPARSE_STATIC");
    m->sparse_lowmem = m->sparse_lowmem || env_flag("EDGEACT_SPARSE_LOWMEM");
    m->fused = calloc((size_t)m->n_steps / 2 + 1, sizeof *m->fused);
    if (!m->fused) {
        ea_fail(err, "out of memory");
        rc = EA_ERR_NOMEM;
        goto done;
    }
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (!st->sparse_src || st->cm_ready || st->fuse) continue;
        const ea_qweight *ws[EA_FUSE_MAX] = {&st->qw};
        int members[EA_FUSE_MAX] = {s}, nm = 1;
        for (int t = s + 1; t < m->n_steps && nm < EA_FUSE_MAX; t++) {
            const step *o = &m->steps[t];
            if (o->sparse_src && !o->fuse && o->in[0] == st->in[0] && o->qw.K == st->qw.K &&
                o->qw.block_size == st->qw.block_size && !o->qw.zero_points == !st->qw.zero_points) {
                ws[nm] = &o->qw;
                members[nm++] = t;
            }
        }
        const char *what = nm > 1 ? "stacked channel-major repack" : "channel-major repack";
        ea_qweight_cm *cm = nm > 1 ? &m->fused[m->n_fused].cm : &st->cm;
        int krc = ea_qweight_cm_init_concat(cm, m->isa, ws, nm);
        if (krc) {
            if (krc == EA_KERR_NOMEM) rc = EA_ERR_NOMEM;
            ea_fail(err, "node '%s': %s failed: %s", st->name, what, ea_kernels_strerror(krc));
            goto done;
        }
        m->bytes_repacked += cm->bytes;
        if (nm > 1) {
            fused_gemv *g = &m->fused[m->n_fused++];
            g->n = nm;
            for (int i = 0, off = 0; i < nm; off += ws[i]->N, i++) {
                g->step[i] = members[i];
                m->steps[members[i]].fuse = m->n_fused;
                m->steps[members[i]].fuse_off = off;
            }
            if (cm->N > m->max_fused_n) m->max_fused_n = cm->N;
        } else {
            st->cm_ready = 1;
        }
        for (int i = 0; i < nm; i++) {
            step *mi = &m->steps[members[i]];
            if (!mi->qw.packed) continue;
            ea_release_pages(m, mi->qw.data,
                             ea_qweight_file_bytes((size_t)mi->qw.N, (size_t)mi->qw.n_blocks, mi->qw.block_size, mi->qw.bits).data);
            /* low memory: the repack goes; decode and prefill rows all run the input-sparse GEMV
             * (scalar weights have no repack and keep their dense path on the file layout) */
            if (m->sparse_lowmem) {
                m->bytes_repacked -= mi->qw.packed_bytes;
                ea_qweight_release(&mi->qw);
                mi->dense_dropped = 1;
            }
        }
    }
    /* CoreInfer: gate/up feeding a NeuronMask through SiLU-gate compute only the kept rows */
    count_uses(m, uses);
    for (int s = 0; s < m->n_steps; s++) {
        if (m->steps[s].op != OP_NEURON_MASK) continue;
        const int p = m->values[m->steps[s].in[0]].producer;
        if (p < 0 || m->steps[p].op != OP_SILU_MUL || uses[m->steps[s].in[0]] != 1) continue;
        for (int k = 0; k < 2; k++) {
            const int v = m->steps[p].in[k], q = v >= 0 ? m->values[v].producer : -1;
            if (q >= 0 && m->steps[q].op == OP_QMATMUL && !m->steps[q].f32act && uses[v] == 1)
                m->steps[q].row_src = s + 1;
        }
    }
    /* CATS: up_proj times the sparsified gate activation needs only the rows it keeps */
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op != OP_QMATMUL || st->f32act || st->sparse_src || st->row_src || st->fuse || st->out < 0 ||
            uses[st->out] != 1 || !st->qw.data)
            continue;
        for (int t = s + 1; t < m->n_steps; t++) {
            const step *mul = &m->steps[t];
            if (mul->op != OP_MUL || (mul->in[0] != st->out && mul->in[1] != st->out)) continue;
            const int other = mul->in[0] == st->out ? mul->in[1] : mul->in[0];
            const int q = other >= 0 && other != st->out ? m->values[other].producer : -1;
            if (q >= 0 && q < s && m->steps[q].op == OP_SPARSIFY && m->values[other].width == st->N &&
                rows_copy(m, st) == 0)
                st->rowsel_src = q + 1;
            break;
        }
    }
    m->hidden = 0;
    for (int i = 0; i < m->n_values; i++) {
        value *v = &m->values[i];
        if (v->kind == V_ACT && v->width > m->max_act_width) m->max_act_width = v->width;
        if (v->kind == V_ACT && v->hidden_layer >= 0) {
            if (v->hidden_layer + 1 > m->n_hidden) m->n_hidden = v->hidden_layer + 1;
            if (m->hidden && v->width != m->hidden) {
                ea_fail(err, "hidden.%d has width %d, other hidden states %d", v->hidden_layer, v->width, m->hidden);
                goto done;
            }
            m->hidden = v->width;
        }
    }
    for (int s = 0; s < m->n_steps; s++)
        if (m->steps[s].op == OP_GATHER && !m->hidden) m->hidden = m->steps[s].N;
    if (m->n_steer && m->n_hidden == 0) {
        ea_fail(err, "Steer nodes present but no hidden.{i} outputs");
        goto done;
    }
    for (int s = 0; s < m->n_steps; s++)
        if (m->steps[s].op == OP_STEER && (m->steps[s].layer >= m->n_steer || m->values[m->steps[s].in[0]].width != m->hidden)) {
            ea_fail(err, "node '%s': steering layer %d out of range (Steer nodes: %d)", m->steps[s].name,
                    m->steps[s].layer, m->n_steer);
            goto done;
        }
    for (int s = 0; s < m->n_steps; s++)
        if (m->steps[s].op == OP_NEURON_MASK && m->steps[s].layer >= m->n_nmask) {
            ea_fail(err, "node '%s': mask layer %d out of range (NeuronMask nodes: %d)", m->steps[s].name,
                    m->steps[s].layer, m->n_nmask);
            goto done;
        }
    if (assign_slots(m, err)) goto done;
    mark_direct_fused(m);
    rc = EA_OK;
done:
    free(uses);
    free(b.nm.idx);
    return rc;
}

void ea_model_destroy(ea_model *m) {
    for (int s = 0; s < m->n_steps; s++) {
        if (m->steps[s].qw_ready) ea_qweight_release(&m->steps[s].qw);
        if (m->steps[s].cm_ready) ea_qweight_cm_release(&m->steps[s].cm);
        if (m->steps[s].rows_buf) {
            ea_qweight_release(&m->steps[s].rows_qw);
            free(m->steps[s].rows_buf);
        }
    }
    for (int g = 0; g < m->n_fused; g++) ea_qweight_cm_release(&m->fused[g].cm);
    free(m->fused);
    free(m->steps);
    free(m->values);
    free(m->slot_width);
    onnx_free(&m->onnx);
    ea_unmap_external(m);
}
