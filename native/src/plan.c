/* The planner: the ONNX graph checked against docs/model-folder.md and turned into steps.
 * Graph inputs and initializers become values; each node goes to its op's plan (ops/, found
 * through the op table), which checks it and binds its weights; then the graph passes
 * (passes.c) fuse, link and assign buffers. */
#define _GNU_SOURCE /* MAP_ANONYMOUS */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ops/ops.h"
#include "weights.h"

int ea_plan_passes(ea_model *m, ea_err *err);

/* ---- name → value index (open addressing) ------------------------------- */

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull;
    return h;
}
static int map_find(const ea_planner *b, const char *name) {
    for (uint64_t h = hash_str(name) & (uint64_t)(b->nm.cap - 1);; h = (h + 1) & (uint64_t)(b->nm.cap - 1)) {
        int i = b->nm.idx[h];
        if (i < 0) return -1;
        if (!strcmp(b->m->values[i].name, name)) return i;
    }
}
static void map_put(ea_planner *b, const char *name, int index) {
    uint64_t h = hash_str(name) & (uint64_t)(b->nm.cap - 1);
    while (b->nm.idx[h] >= 0) h = (h + 1) & (uint64_t)(b->nm.cap - 1);
    b->nm.idx[h] = index;
}

static int new_value(ea_planner *b, const char *name, value_kind kind, int dtype, int width) {
    ea_model *m = b->m;
    value *v = ea_push((void **)&m->values, &m->n_values, &b->cap_values, sizeof(value));
    if (!v) return -1;
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
    map_put(b, name, m->n_values - 1);
    return m->n_values - 1;
}

/* ---- node helpers ---------------------------------------------------------- */
int ea_node_fail(ea_planner *b, const onnx_node *nd, const char *fmt, ...) {
    char detail[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return ea_fail(b->err, "node '%s' (%s%s%s): %s", nd->name, nd->domain, *nd->domain ? "." : "", nd->op_type, detail);
}

int ea_attr_int(ea_planner *b, const onnx_node *nd, const char *name, int64_t def, int required, int64_t *out) {
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
int ea_attr_float(ea_planner *b, const onnx_node *nd, const char *name, float def, float *out) {
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
int ea_check_attrs(ea_planner *b, const onnx_node *nd, const char *const *known) {
    for (int i = 0; i < nd->n_attrs; i++) {
        int ok = 0;
        for (const char *const *k = known; *k; k++) ok |= !strcmp(*k, nd->attrs[i].name);
        if (!ok) NODE_FAIL("attribute '%s' is not supported", nd->attrs[i].name);
    }
    return 0;
}

int ea_get_input(ea_planner *b, const onnx_node *nd, int k, int required, int *out) {
    *out = -1;
    if (k >= nd->n_inputs || !*nd->inputs[k]) {
        if (required) NODE_FAIL("input %d is missing", k);
        return 0;
    }
    int v = map_find(b, nd->inputs[k]);
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
int ea_op_layer(ea_planner *b, const onnx_node *nd, int si, op_kind op, const char *init_name, const char *fmt,
                    int order, int *layer) {
    char tail;
    if (sscanf(init_name, fmt, layer, &tail) != 1 || *layer < 0) *layer = order;
    for (int j = 0; j < si; j++)
        if (b->m->steps[j].op == op && b->m->steps[j].layer == *layer)
            NODE_FAIL("a second %s node for layer %d", nd->op_type, *layer);
    return 0;
}

int ea_need_act(ea_planner *b, const onnx_node *nd, int k, int v) {
    if (b->m->values[v].kind != V_ACT)
        NODE_FAIL("input %d '%s' must be a computed activation", k, b->m->values[v].name);
    return 0;
}

/* Copies of 64 KiB or more get a mapping of their own: freed, it goes back to the system at once,
 * where a heap keeps freed blocks for reuse and the load's peak would carry them. */
#define COPY_MAP_MIN ((size_t)64 << 10)

static float *copy_alloc(size_t n, size_t *mapped) {
    const size_t bytes = (n ? n : 1) * sizeof(float);
    *mapped = 0;
    if (bytes < COPY_MAP_MIN) return malloc(bytes);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    *mapped = bytes;
    return p;
}

static void copy_free(f32_copy *c) {
    if (c->mapped && c->t.owned) munmap(c->t.owned, c->mapped);
    else free(c->t.owned);
    c->t.owned = NULL;
    c->t.data = NULL;
    c->mapped = 0;
}

/* The nodes reading value `name`: the last one into *last; 0 if one of them is not a
 * MatMulNBits (reading it as input `slot`, or any input if slot < 0) or a lookup, else 1. */
static int readers_of(const ea_model *m, const char *name, int slot, int *last) {
    int only = 1;
    for (int n = 0; n < m->onnx.n_nodes; n++) {
        const onnx_node *nd = &m->onnx.nodes[n];
        for (int k = 0; k < nd->n_inputs; k++) {
            if (strcmp(nd->inputs[k], name)) continue;
            if (n > *last) *last = n;
            const int mm = !strcmp(nd->op_type, "MatMulNBits") && (slot < 0 || k == slot);
            only &= mm || (slot < 0 && !strcmp(nd->op_type, "GatherBlockQuantized"));
        }
    }
    return only;
}

/* The readers of fp16 tensor src through every Cast of it (a tied table may be cast twice). */
static void note_readers(const ea_model *m, f32_copy *c, const onnx_tensor *src) {
    c->early = 1;
    for (int n = 0; n < m->onnx.n_nodes; n++) {
        const onnx_node *nd = &m->onnx.nodes[n];
        if (!*nd->domain && !strcmp(nd->op_type, "Cast") && nd->n_inputs >= 1 && nd->n_outputs >= 1 &&
            !strcmp(nd->inputs[0], src->name))
            c->early &= readers_of(m, nd->outputs[0], -1, &c->last_ref);
    }
}

/* A new float32 copy of n elements shaped as `like`, registered with the model (freed with it, or
 * earlier by free_unread_copies); NULL when out of memory, with nothing left behind. */
static f32_copy *new_copy(ea_model *m, const onnx_tensor *like, size_t n) {
    f32_copy *c = calloc(1, sizeof *c);
    size_t mapped = 0;
    float *buf = c ? copy_alloc(n, &mapped) : NULL;
    f32_copy **slot = buf ? ea_push((void **)&m->f32c, &m->n_f32c, &m->cap_f32c, sizeof *slot) : NULL;
    if (!slot) {
        if (c) {
            c->t.owned = buf;
            c->mapped = mapped;
            copy_free(c);
        }
        free(c);
        return NULL;
    }
    *slot = c;
    c->mapped = mapped;
    c->last_ref = -1;
    c->t = *like;
    c->t.dtype = ONNX_FLOAT;
    c->t.data = (const uint8_t *)buf;
    c->t.nbytes = n * sizeof(float);
    c->t.owned = buf;
    m->bytes_copied += c->t.nbytes;
    return c;
}

static void fill_f16(float *buf, const onnx_tensor *t, int n) {
    const uint16_t *h = (const uint16_t *)t->data;
    for (int i = 0; i < n; i++) buf[i] = ea_f16_to_f32(h[i]);
}

/* The float32 copy of fp16 tensor t (made once, shared by every reader). Only the weights of
 * MatMulNBits and GatherBlockQuantized are followed after planning (free_unread_copies): another
 * reader keeps the copy. */
static const onnx_tensor *f32_copy_of(ea_planner *b, const onnx_node *nd, const onnx_tensor *t) {
    ea_model *m = b->m;
    const int other = strcmp(nd->op_type, "MatMulNBits") != 0 && strcmp(nd->op_type, "GatherBlockQuantized") != 0;
    const int n = ea_numel(t);
    if (n < 0) {
        ea_node_fail(b, nd, "initializer '%s' is too large", t->name);
        return NULL;
    }
    for (int i = 0; i < m->n_f32c; i++) {
        f32_copy *c = m->f32c[i];
        if (c->src != t) continue;
        c->keep |= other;
        if (!c->t.owned) { /* freed after its readers so far: a reader the scan of Casts missed */
            float *buf = copy_alloc((size_t)n, &c->mapped);
            if (!buf) {
                ea_node_fail(b, nd, "out of memory converting '%s' to float32", t->name);
                return NULL;
            }
            fill_f16(buf, t, n);
            c->t.owned = buf;
            c->t.data = (const uint8_t *)buf;
            c->early = 0;
            m->bytes_copied += c->t.nbytes;
        }
        return &c->t;
    }
    f32_copy *c = new_copy(m, t, (size_t)n);
    if (!c) {
        ea_node_fail(b, nd, "out of memory converting '%s' to float32", t->name);
        return NULL;
    }
    fill_f16(c->t.owned, t, n);
    c->src = t;
    c->keep = other;
    note_readers(m, c, t);
    /* from here on the copy is read, not the fp16 bytes */
    ea_release_pages(m, t->data, t->nbytes);
    return &c->t;
}

/* Does a lookup in table g find a MatMulNBits repack of it (ops/gather_block_quantized.c reads
 * its rows there, and the file layout otherwise)? */
static int lookup_has_repack(const ea_model *m, const ea_qweight *g) {
    for (int s = 0; s < m->n_steps; s++) {
        const step *o = &m->steps[s];
        const ea_qweight *w = &o->qw;
        if (o->op == OP_QMATMUL && o->qw_ready && w->packed && !w->has_minimums && w->data == g->data && w->N == g->N &&
            w->n_blocks == g->n_blocks && w->bits == g->bits && w->block_size == g->block_size &&
            w->zero_points == g->zero_points && w->scales == g->scales)
            return 1;
    }
    return 0;
}

/* Is a folded constant read only as MatMulNBits float zero points? Those are read at plan only: the
 * op makes them the weight's block minimums (ops/matmul_nbits.c). */
static int only_float_zero_points(const ea_model *m, const char *name) {
    for (int n = 0; n < m->onnx.n_nodes; n++) {
        const onnx_node *nd = &m->onnx.nodes[n];
        for (int k = 0; k < nd->n_inputs; k++)
            if (!strcmp(nd->inputs[k], name) &&
                (k != 3 || strcmp(nd->op_type, "MatMulNBits") || m->steps[n].op != OP_QMATMUL))
                return 0;
    }
    return 1;
}

/* A float32 copy whose every reader kept only its SIMD repack (which holds the scales itself) is
 * not read again. Readers of the file layout keep it: scalar and float-activation weights, a
 * lookup without a repack, CoreInfer's kept-rows copies (made per session) and CATS rows without
 * a copy of their own. */
static int copy_is_read(const ea_model *m, const f32_copy *c) {
    const float *buf = (const float *)c->t.owned;
    /* a folded constant read only as float zero points: they became the steps' block minimums */
    int read = c->folded ? !only_float_zero_points(m, c->t.name) : c->keep;
    for (int s = 0; s < m->n_steps && !read; s++) {
        const step *st = &m->steps[s];
        if (!st->qw_ready || st->qw.scales != buf) continue;
        if (st->op == OP_GATHER_BQ) read = !lookup_has_repack(m, &st->qw);
        else read = !st->qw.packed || st->f32act || st->row_src || (st->rowsel_src && !st->rows_buf);
    }
    return read;
}

static void drop_copy(ea_model *m, f32_copy *c) {
    const float *buf = (const float *)c->t.owned;
    /* every holder forgets it alike (a lookup still finds lm_head's repack by equal pointers) */
    for (int s = 0; s < m->n_steps; s++)
        if (m->steps[s].qw_ready && m->steps[s].qw.scales == buf) m->steps[s].qw.scales = NULL;
    m->bytes_copied -= c->t.nbytes;
    copy_free(c);
}

/* After the passes: every copy nothing reads any more. */
static void free_unread_copies(ea_model *m) {
    for (int i = 0; i < m->n_f32c; i++)
        if (m->f32c[i]->t.owned && !copy_is_read(m, m->f32c[i])) drop_copy(m, m->f32c[i]);
}

/* Once node `last` is planned: a copy whose readers are all planned, every one a MatMulNBits or a
 * lookup, goes now if none of them reads it, so the copies of the layers' scales (and lm_head's)
 * are not all held while the weights after them are repacked. Without Sparsify and NeuronMask
 * nodes no pass reads them again (CATS rows, CoreInfer, the stacked sparse repacks). */
static void free_planned_copies(ea_model *m, int last) {
    for (int i = 0; i < m->n_f32c; i++) {
        f32_copy *c = m->f32c[i];
        if (!c->t.owned || !c->early || c->last_ref < 0 || c->last_ref > last) continue;
        c->early = 0; /* decided once: what reads it now reads it until the passes */
        if (!copy_is_read(m, c)) drop_copy(m, c);
    }
}

const onnx_tensor * ea_need_const(ea_planner *b, const onnx_node *nd, int k, int v, int dtype, int ndim) {
    const value *val = &b->m->values[v];
    if (val->kind != V_CONST || !val->tensor) {
        ea_node_fail(b, nd, "input %d '%s' must be an initializer", k, val->name);
        return NULL;
    }
    const onnx_tensor *t = val->tensor;
    /* a Cast(float16 initializer) where float32 data is needed: read its float32 copy */
    if (val->cast_f16 && dtype == ONNX_FLOAT && t->dtype == ONNX_FLOAT16) {
        t = f32_copy_of(b, nd, t);
        if (!t) return NULL;
        if (ndim >= 0 && t->ndim != ndim) {
            ea_node_fail(b, nd, "initializer '%s' has %d dims, expected %d", t->name, t->ndim, ndim);
            return NULL;
        }
        return t;
    }
    int dt = val->cast_f16 ? ONNX_FLOAT16 : t->dtype;
    if (dtype && dt != dtype) {
        ea_node_fail(b, nd, "initializer '%s' is %s, expected %s", t->name, onnx_dtype_name(dt), onnx_dtype_name(dtype));
        return NULL;
    }
    if (ndim >= 0 && t->ndim != ndim) {
        ea_node_fail(b, nd, "initializer '%s' has %d dims, expected %d", t->name, t->ndim, ndim);
        return NULL;
    }
    return t;
}

int ea_numel(const onnx_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->dims[i]; /* bounded by ea_resolve_tensors */
    return n > INT32_MAX ? -1 : (int)n;
}

int ea_check_dim(ea_planner *b, const onnx_node *nd, int64_t d, const char *what) {
    if (d <= 0 || d > (1 << 24)) NODE_FAIL("%s %lld is out of range", what, (long long)d);
    return 0;
}

int ea_add_output(ea_planner *b, const onnx_node *nd, int k, value_kind kind, int dtype, int width, int step) {
    if (k >= nd->n_outputs || !*nd->outputs[k]) NODE_FAIL("output %d is missing", k);
    const char *name = nd->outputs[k];
    if (map_find(b, name) >= 0) NODE_FAIL("output '%s' is already defined earlier in the graph", name);
    int v = new_value(b, name, kind, dtype, width);
    if (v < 0) return ea_fail(b->err, "out of memory");
    b->m->values[v].producer = step;
    return v;
}

int ea_only_outputs(ea_planner *b, const onnx_node *nd, int n) {
    for (int k = n; k < nd->n_outputs; k++)
        if (*nd->outputs[k]) NODE_FAIL("optional output %d ('%s') is not supported", k, nd->outputs[k]);
    return 0;
}

/* ---- constant folding ------------------------------------------------------------------------ */
/* Element i of a float constant: float32, or float16 through a Cast (converted exactly). */
static float const_elem(const value *v, size_t i) {
    if (v->cast_f16) return ea_f16_to_f32(((const uint16_t *)v->tensor->data)[i]);
    float f;
    memcpy(&f, v->tensor->data + 4 * i, sizeof f);
    return f;
}

/* Div of two float constants (float32, or fp16 through a Cast), elementwise or by a scalar: computed
 * once here, IEEE division as onnxruntime's constant folding does, into a model-owned float32
 * tensor. The writer stores float zero points so: Div(Cast(-minimum), Cast(scale)) with fp16
 * minimums and scales, half the bytes of float32 zero points, and -zp*scale then rounds back to
 * the stored minimum (ops/matmul_nbits.c). */
static int fold_div(ea_planner *b, const onnx_node *nd, step *st, int va, int vb) {
    ea_model *m = b->m;
    const int si = (int)(st - m->steps);
    const value *A = &m->values[va], *B = &m->values[vb];
    for (int k = 0; k < 2; k++) {
        const value *v = k ? B : A;
        if (!v->cast_f16 && v->tensor->dtype != ONNX_FLOAT)
            NODE_FAIL("dividing initializer '%s' of type %s is not supported (float32, or float16 through a Cast)",
                      v->name, onnx_dtype_name(v->tensor->dtype));
    }
    const int na = ea_numel(A->tensor), nb = ea_numel(B->tensor);
    if (na < 0 || nb < 0 || (nb != na && nb != 1))
        NODE_FAIL("initializers '%s' (%d elements) and '%s' (%d) must have the same size, or the divisor one element",
                  A->name, na, B->name, nb);
    if (ea_only_outputs(b, nd, 1)) return -1;
    f32_copy *c = new_copy(m, A->tensor, (size_t)na);
    if (!c) NODE_FAIL("out of memory");
    c->early = readers_of(m, nd->outputs[0], 3, &c->last_ref); /* float zero points, read at plan only */
    float *buf = c->t.owned;
    for (size_t i = 0; i < (size_t)na; i++) buf[i] = const_elem(A, i) / const_elem(B, nb == 1 ? 0 : i);
    c->folded = 1;
    c->t.name = (char *)nd->outputs[0];
    c->t.external = 0;
    c->t.location = NULL;
    st->op = OP_NOP;
    st->out = ea_add_output(b, nd, 0, V_CONST, ONNX_FLOAT, 0, si);
    if (st->out < 0) return -1;
    m->values[st->out].tensor = &c->t;
    return 0;
}

/* A node the planner computes itself at load: Div of two constants. 1: folded (or failed, with
 * *rc set), 0: an ordinary node. */
static int try_fold(ea_planner *b, const onnx_node *nd, step *st, int *rc) {
    if (strcmp(nd->op_type, "Div") || *nd->domain || nd->n_inputs != 2) return 0;
    int va, vb;
    const int known = map_find(b, nd->inputs[0]) >= 0 && map_find(b, nd->inputs[1]) >= 0;
    if (!known) return 0;
    *rc = ea_get_input(b, nd, 0, 1, &va) || ea_get_input(b, nd, 1, 1, &vb) ? -1 : 0;
    if (*rc) return 1;
    if (b->m->values[va].kind != V_CONST || !b->m->values[va].tensor || b->m->values[vb].kind != V_CONST ||
        !b->m->values[vb].tensor)
        return 0;
    static const char *const none[] = {NULL};
    *rc = ea_check_attrs(b, nd, none) ? -1 : fold_div(b, nd, st, va, vb);
    return 1;
}

/* ---- one node -> one step ------------------------------------------------------------------ */
static int plan_node(ea_planner *b, int ni, step *st) {
    const onnx_node *nd = &b->m->onnx.nodes[ni];
    st->node = ni;
    st->name = nd->name;
    st->op_type = nd->op_type;
    st->in[0] = st->in[1] = st->in[2] = -1;
    st->out = -1;
    st->layer = -1;
    int rc;
    if (try_fold(b, nd, st, &rc)) return rc;
    const int kind = ea_op_find(nd->domain, nd->op_type);
    if (kind < 0) {
        char list[512];
        ea_op_supported(list, sizeof list);
        NODE_FAIL("op type '%s%s%s' is not supported by the native runtime (supported: %s)", nd->domain,
                  *nd->domain ? "." : "", nd->op_type, list);
    }
    st->op = (op_kind)kind;
    return ea_ops[kind]->plan(b, nd, st);
}

/* ---- graph inputs and initializers -------------------------------------------- */
/* ---- graph inputs and initializers -------------------------------------------- */
static int add_graph_inputs(ea_planner *b) {
    ea_model *m = b->m;
    onnx_model *om = &m->onnx;
    m->ids_value = -1;
    for (int i = 0; i < om->n_inits; i++) {
        onnx_tensor *t = &om->inits[i];
        if (map_find(b, t->name) >= 0) return ea_fail(b->err, "initializer '%s' is defined twice", t->name);
        int v = new_value(b, t->name, V_CONST, t->dtype, 0);
        if (v < 0) return ea_fail(b->err, "out of memory");
        m->values[v].tensor = t;
    }
    for (int i = 0; i < om->n_inputs; i++) {
        const onnx_value_info *vi = &om->inputs[i];
        const char *n = vi->name;
        int existing = map_find(b, n);
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
    ea_planner b = {m, err, {0, NULL}, 0};
    int total = om->n_inits + om->n_inputs + 1;
    for (int i = 0; i < om->n_nodes; i++) total += om->nodes[i].n_outputs;
    b.nm.cap = 16;
    while (b.nm.cap < 2 * total) b.nm.cap *= 2;
    b.nm.idx = malloc(sizeof(int) * (size_t)b.nm.cap);
    m->steps = calloc((size_t)om->n_nodes + 1, sizeof(step));
    int rc = EA_ERR_FORMAT;
    if (!b.nm.idx || !m->steps) {
        ea_fail(err, "out of memory");
        rc = EA_ERR_NOMEM;
        goto done;
    }
    memset(b.nm.idx, 0xff, sizeof(int) * (size_t)b.nm.cap);
    if (add_graph_inputs(&b)) goto done;
    int early = 1;
    for (int i = 0; i < om->n_nodes; i++)
        early &= strcmp(om->nodes[i].op_type, "Sparsify") && strcmp(om->nodes[i].op_type, "NeuronMask");
    for (int i = 0; i < om->n_nodes; i++) {
        m->n_steps = i + 1;
        if (plan_node(&b, i, &m->steps[i])) goto done;
        if (early) free_planned_copies(m, i);
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
        int v = map_find(&b, om->outputs[i].name);
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
    /* a lookup in a block-quantized table gives rows padded to whole blocks: the first norm reads the hidden state */
    for (int s = 0; s < m->n_steps && !m->hidden; s++)
        if (m->steps[s].op == OP_RMSNORM) m->hidden = m->values[m->steps[s].in[0]].width;
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
    rc = ea_plan_passes(m, err);
    if (rc == EA_OK) free_unread_copies(m);
done:
    free(b.nm.idx);
    return rc;
}

void ea_model_destroy(ea_model *m) {
    for (int s = 0; s < m->n_steps; s++) {
        if (m->steps[s].qw_ready) ea_qweight_release(&m->steps[s].qw);
        free(m->steps[s].qmin);
        if (m->steps[s].cm_ready) ea_qweight_cm_release(&m->steps[s].cm);
        if (m->steps[s].rows_buf) {
            ea_qweight_release(&m->steps[s].rows_qw);
            free(m->steps[s].rows_buf);
        }
    }
    for (int g = 0; g < m->n_fused; g++) ea_qweight_cm_release(&m->fused[g].cm);
    for (int i = 0; i < m->n_f32c; i++) {
        copy_free(m->f32c[i]);
        free(m->f32c[i]);
    }
    free(m->f32c);
    free(m->fused);
    free(m->steps);
    free(m->values);
    free(m->slot_width);
    onnx_free(&m->onnx);
    ea_unmap_external(m);
}
