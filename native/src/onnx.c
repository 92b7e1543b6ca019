#include "onnx.h"

#include <stdlib.h>
#include <string.h>

#include "protobuf.h"

#define TRY(x)                       \
    do {                             \
        if ((x)) return -1;          \
    } while (0)

size_t onnx_dtype_size(int dtype) {
    switch (dtype) {
    case ONNX_FLOAT: case ONNX_INT32: return 4;
    case ONNX_UINT8: case ONNX_INT8: return 1;
    case ONNX_INT64: return 8;
    case ONNX_FLOAT16: return 2;
    default: return 0;
    }
}

const char *onnx_dtype_name(int dtype) {
    switch (dtype) {
    case ONNX_FLOAT: return "float32";
    case ONNX_UINT8: return "uint8";
    case ONNX_INT8: return "int8";
    case ONNX_INT32: return "int32";
    case ONNX_INT64: return "int64";
    case ONNX_FLOAT16: return "float16";
    case 0: return "undefined";
    default: return "unsupported-type";
    }
}

const onnx_attr *onnx_attr_find(const onnx_node *node, const char *name) {
    for (int i = 0; i < node->n_attrs; i++)
        if (!strcmp(node->attrs[i].name, name)) return &node->attrs[i];
    return NULL;
}

static int bad(ea_err *err, const char *what) {
    return ea_fail(err, "malformed model.onnx: truncated or invalid protobuf in %s", what);
}

static int read_string(pb_reader *r, char **out, const char *what, ea_err *err) {
    const uint8_t *d;
    size_t n;
    if (pb_len(r, &d, &n)) return bad(err, what);
    if (memchr(d, 0, n)) return ea_fail(err, "malformed model.onnx: NUL byte inside a string in %s", what);
    free(*out); /* a repeated singular field: last one wins, as protobuf says */
    *out = ea_strndup((const char *)d, n);
    if (!*out) return ea_fail(err, "out of memory reading %s", what);
    return 0;
}

static int oom(ea_err *err) { return ea_fail(err, "out of memory while reading model.onnx"); }

static int push_string(char ***arr, int *n, int *cap, pb_reader *r, const char *what, ea_err *err) {
    char **slot = ea_push((void **)arr, n, cap, sizeof(char *));
    if (!slot) return oom(err);
    return read_string(r, slot, what, err);
}

/* Repeated int64 in either packed or unpacked encoding. */
static int read_int64s(pb_reader *r, int wt, int64_t **arr, int *n, int *cap, const char *what, ea_err *err) {
    if (wt == PB_VARINT) {
        uint64_t v;
        if (pb_varint(r, &v)) return bad(err, what);
        int64_t *e = ea_push((void **)arr, n, cap, sizeof(int64_t));
        if (!e) return oom(err);
        *e = (int64_t)v;
        return 0;
    }
    if (wt != PB_LEN) return bad(err, what);
    const uint8_t *d;
    size_t len;
    if (pb_len(r, &d, &len)) return bad(err, what);
    pb_reader sub = pb_make(d, len);
    while (!pb_done(&sub)) {
        uint64_t v;
        if (pb_varint(&sub, &v)) return bad(err, what);
        int64_t *e = ea_push((void **)arr, n, cap, sizeof(int64_t));
        if (!e) return oom(err);
        *e = (int64_t)v;
    }
    return 0;
}

static int parse_tensor(const uint8_t *d, size_t len, onnx_tensor *t, ea_err *err) {
    pb_reader r = pb_make(d, len);
    int64_t *dims = NULL;
    int n_dims = 0, cap_dims = 0;
    t->ext_offset = t->ext_length = -1;
    int rc = 0;
    while (!pb_done(&r) && !rc) {
        uint32_t f;
        int wt;
        if (pb_tag(&r, &f, &wt)) { rc = bad(err, "TensorProto"); break; }
        const uint8_t *p;
        size_t n;
        uint64_t v;
        switch (f) {
        case 1: rc = read_int64s(&r, wt, &dims, &n_dims, &cap_dims, "TensorProto.dims", err); break;
        case 2:
            if (wt != PB_VARINT || pb_varint(&r, &v)) { rc = bad(err, "TensorProto.data_type"); break; }
            t->dtype = v > 1000 ? 0 : (int)v;
            break;
        case 8:
            if (wt != PB_LEN) { rc = bad(err, "TensorProto.name"); break; }
            rc = read_string(&r, &t->name, "TensorProto.name", err);
            break;
        case 9: /* raw_data */
        case 4: /* float_data, packed: the same bytes as raw little-endian floats */
            if (wt != PB_LEN || pb_len(&r, &p, &n)) { rc = bad(err, "TensorProto data"); break; }
            t->data = p;
            t->nbytes = n;
            t->has_data = 1;
            break;
        case 5: case 6: case 7: case 10: case 11:
            t->unsupported_field = f == 5 ? "int32_data" : f == 6 ? "string_data" : f == 7 ? "int64_data"
                                 : f == 10 ? "double_data" : "uint64_data";
            if (pb_skip(&r, wt)) rc = bad(err, "TensorProto");
            break;
        case 13: { /* external_data: StringStringEntryProto {key=1, value=2} */
            if (wt != PB_LEN || pb_len(&r, &p, &n)) { rc = bad(err, "TensorProto.external_data"); break; }
            pb_reader e = pb_make(p, n);
            char *key = NULL, *val = NULL;
            while (!pb_done(&e) && !rc) {
                uint32_t ef;
                int ewt;
                if (pb_tag(&e, &ef, &ewt)) { rc = bad(err, "external_data entry"); break; }
                if ((ef == 1 || ef == 2) && ewt == PB_LEN)
                    rc = read_string(&e, ef == 1 ? &key : &val, "external_data entry", err);
                else if (pb_skip(&e, ewt)) rc = bad(err, "external_data entry");
            }
            if (!rc && key && val) {
                if (!strcmp(key, "location")) {
                    free(t->location);
                    t->location = val;
                    val = NULL;
                } else if (!strcmp(key, "offset") || !strcmp(key, "length")) {
                    char *end;
                    long long x = strtoll(val, &end, 10);
                    if (!*val || *end || x < 0)
                        rc = ea_fail(err, "initializer '%s': external_data %s '%s' is not a non-negative integer",
                                     t->name ? t->name : "?", key, val);
                    else if (!strcmp(key, "offset")) t->ext_offset = x;
                    else t->ext_length = x;
                }
            }
            free(key);
            free(val);
            break;
        }
        case 14:
            if (wt != PB_VARINT || pb_varint(&r, &v)) { rc = bad(err, "TensorProto.data_location"); break; }
            t->external = v == 1;
            break;
        default:
            if (pb_skip(&r, wt)) rc = bad(err, "TensorProto");
        }
    }
    if (!rc) {
        if (n_dims > ONNX_MAX_DIMS) rc = ea_fail(err, "initializer '%s': %d dims (at most %d supported)",
                                                 t->name ? t->name : "?", n_dims, ONNX_MAX_DIMS);
        else {
            t->ndim = n_dims;
            for (int i = 0; i < n_dims; i++) t->dims[i] = dims[i];
        }
    }
    free(dims);
    if (!rc && !t->name) rc = ea_fail(err, "model.onnx: an initializer has no name");
    return rc;
}

static int parse_attr(const uint8_t *d, size_t len, onnx_attr *a, ea_err *err) {
    pb_reader r = pb_make(d, len);
    int cap_ints = 0, cap_floats = 0;
    while (!pb_done(&r)) {
        uint32_t f;
        int wt;
        uint64_t v;
        uint32_t u;
        const uint8_t *p;
        size_t n;
        TRY(pb_tag(&r, &f, &wt) ? bad(err, "AttributeProto") : 0);
        switch (f) {
        case 1:
            if (wt != PB_LEN) return bad(err, "AttributeProto.name");
            TRY(read_string(&r, &a->name, "AttributeProto.name", err));
            break;
        case 2:
            if (wt != PB_I32 || pb_fixed32(&r, &u)) return bad(err, "AttributeProto.f");
            memcpy(&a->f, &u, 4);
            break;
        case 3:
            if (wt != PB_VARINT || pb_varint(&r, &v)) return bad(err, "AttributeProto.i");
            a->i = (int64_t)v;
            break;
        case 4:
            if (wt != PB_LEN) return bad(err, "AttributeProto.s");
            TRY(read_string(&r, &a->s, "AttributeProto.s", err));
            break;
        case 7: /* floats: packed or not */
            if (wt == PB_I32) {
                float *e = ea_push((void **)&a->floats, &a->n_floats, &cap_floats, sizeof(float));
                if (!e) return oom(err);
                if (pb_fixed32(&r, &u)) return bad(err, "AttributeProto.floats");
                memcpy(e, &u, 4);
            } else if (wt == PB_LEN) {
                if (pb_len(&r, &p, &n) || n % 4) return bad(err, "AttributeProto.floats");
                for (size_t k = 0; k < n; k += 4) {
                    float *e = ea_push((void **)&a->floats, &a->n_floats, &cap_floats, sizeof(float));
                    if (!e) return oom(err);
                    memcpy(e, p + k, 4);
                }
            } else return bad(err, "AttributeProto.floats");
            break;
        case 8: TRY(read_int64s(&r, wt, &a->ints, &a->n_ints, &cap_ints, "AttributeProto.ints", err)); break;
        case 20:
            if (wt != PB_VARINT || pb_varint(&r, &v)) return bad(err, "AttributeProto.type");
            a->type = v > 100 ? -1 : (int)v;
            break;
        default:
            if (pb_skip(&r, wt)) return bad(err, "AttributeProto");
        }
    }
    if (!a->name) return ea_fail(err, "malformed model.onnx: an attribute has no name");
    return 0;
}

static int parse_node(const uint8_t *d, size_t len, onnx_node *nd, ea_err *err) {
    pb_reader r = pb_make(d, len);
    int cap_in = 0, cap_out = 0, cap_attr = 0;
    while (!pb_done(&r)) {
        uint32_t f;
        int wt;
        const uint8_t *p;
        size_t n;
        TRY(pb_tag(&r, &f, &wt) ? bad(err, "NodeProto") : 0);
        if ((f >= 1 && f <= 5) || f == 7) {
            if (wt != PB_LEN) return bad(err, "NodeProto");
        }
        switch (f) {
        case 1: TRY(push_string(&nd->inputs, &nd->n_inputs, &cap_in, &r, "NodeProto.input", err)); break;
        case 2: TRY(push_string(&nd->outputs, &nd->n_outputs, &cap_out, &r, "NodeProto.output", err)); break;
        case 3: TRY(read_string(&r, &nd->name, "NodeProto.name", err)); break;
        case 4: TRY(read_string(&r, &nd->op_type, "NodeProto.op_type", err)); break;
        case 7: TRY(read_string(&r, &nd->domain, "NodeProto.domain", err)); break;
        case 5: {
            onnx_attr *a = ea_push((void **)&nd->attrs, &nd->n_attrs, &cap_attr, sizeof(onnx_attr));
            if (!a) return oom(err);
            if (pb_len(&r, &p, &n)) return bad(err, "AttributeProto");
            TRY(parse_attr(p, n, a, err));
            break;
        }
        default:
            if (pb_skip(&r, wt)) return bad(err, "NodeProto");
        }
    }
    if (!nd->op_type) return ea_fail(err, "malformed model.onnx: node '%s' has no op_type", nd->name ? nd->name : "?");
    if (!nd->domain) nd->domain = ea_strndup("", 0);
    if (!nd->name) nd->name = ea_strndup("", 0);
    if (!nd->domain || !nd->name) return oom(err);
    return 0;
}

static int parse_value_info(const uint8_t *d, size_t len, onnx_value_info *vi, ea_err *err) {
    pb_reader r = pb_make(d, len);
    vi->ndim = -1;
    while (!pb_done(&r)) {
        uint32_t f;
        int wt;
        const uint8_t *p;
        size_t n;
        TRY(pb_tag(&r, &f, &wt) ? bad(err, "ValueInfoProto") : 0);
        if (f == 1 && wt == PB_LEN) {
            TRY(read_string(&r, &vi->name, "ValueInfoProto.name", err));
        } else if (f == 2 && wt == PB_LEN) { /* TypeProto */
            if (pb_len(&r, &p, &n)) return bad(err, "TypeProto");
            pb_reader tr = pb_make(p, n);
            while (!pb_done(&tr)) {
                TRY(pb_tag(&tr, &f, &wt) ? bad(err, "TypeProto") : 0);
                if (f != 1 || wt != PB_LEN) {
                    if (pb_skip(&tr, wt)) return bad(err, "TypeProto");
                    continue;
                }
                if (pb_len(&tr, &p, &n)) return bad(err, "TypeProto.tensor_type");
                pb_reader tt = pb_make(p, n);
                while (!pb_done(&tt)) {
                    uint64_t v;
                    TRY(pb_tag(&tt, &f, &wt) ? bad(err, "TypeProto.Tensor") : 0);
                    if (f == 1 && wt == PB_VARINT) {
                        if (pb_varint(&tt, &v)) return bad(err, "TypeProto.Tensor");
                        vi->elem_type = v > 1000 ? -1 : (int)v;
                    } else if (f == 2 && wt == PB_LEN) { /* TensorShapeProto */
                        if (pb_len(&tt, &p, &n)) return bad(err, "TensorShapeProto");
                        pb_reader sr = pb_make(p, n);
                        vi->ndim = 0;
                        while (!pb_done(&sr)) {
                            TRY(pb_tag(&sr, &f, &wt) ? bad(err, "TensorShapeProto") : 0);
                            if (f != 1 || wt != PB_LEN) {
                                if (pb_skip(&sr, wt)) return bad(err, "TensorShapeProto");
                                continue;
                            }
                            if (pb_len(&sr, &p, &n)) return bad(err, "TensorShapeProto.dim");
                            if (vi->ndim >= ONNX_MAX_DIMS)
                                return ea_fail(err, "graph input/output '%s': more than %d dims",
                                               vi->name ? vi->name : "?", ONNX_MAX_DIMS);
                            int64_t dim = -1;
                            pb_reader dr = pb_make(p, n);
                            while (!pb_done(&dr)) {
                                TRY(pb_tag(&dr, &f, &wt) ? bad(err, "Dimension") : 0);
                                if (f == 1 && wt == PB_VARINT) {
                                    if (pb_varint(&dr, &v)) return bad(err, "Dimension");
                                    dim = (int64_t)v;
                                } else if (pb_skip(&dr, wt)) return bad(err, "Dimension");
                            }
                            vi->dims[vi->ndim++] = dim;
                        }
                    } else if (pb_skip(&tt, wt)) return bad(err, "TypeProto.Tensor");
                }
            }
        } else if (pb_skip(&r, wt)) return bad(err, "ValueInfoProto");
    }
    if (!vi->name) return ea_fail(err, "malformed model.onnx: a graph input/output has no name");
    return 0;
}

static int parse_graph(const uint8_t *d, size_t len, onnx_model *m, ea_err *err) {
    pb_reader r = pb_make(d, len);
    while (!pb_done(&r)) {
        uint32_t f;
        int wt;
        const uint8_t *p;
        size_t n;
        TRY(pb_tag(&r, &f, &wt) ? bad(err, "GraphProto") : 0);
        if (wt != PB_LEN || (f != 1 && f != 5 && f != 11 && f != 12 && f != 15)) {
            if (pb_skip(&r, wt)) return bad(err, "GraphProto");
            continue;
        }
        if (pb_len(&r, &p, &n)) return bad(err, "GraphProto");
        if (f == 1) {
            onnx_node *nd = ea_push((void **)&m->nodes, &m->n_nodes, &m->cap_nodes, sizeof(onnx_node));
            if (!nd) return oom(err);
            TRY(parse_node(p, n, nd, err));
        } else if (f == 5) {
            onnx_tensor *t = ea_push((void **)&m->inits, &m->n_inits, &m->cap_inits, sizeof(onnx_tensor));
            if (!t) return oom(err);
            TRY(parse_tensor(p, n, t, err));
        } else if (f == 15) {
            return ea_fail(err, "model.onnx: sparse_initializer is not supported by the native runtime");
        } else {
            onnx_value_info *vi = f == 11
                ? ea_push((void **)&m->inputs, &m->n_inputs, &m->cap_inputs, sizeof(onnx_value_info))
                : ea_push((void **)&m->outputs, &m->n_outputs, &m->cap_outputs, sizeof(onnx_value_info));
            if (!vi) return oom(err);
            TRY(parse_value_info(p, n, vi, err));
        }
    }
    return 0;
}

int onnx_parse(const uint8_t *buf, size_t n, onnx_model *m, ea_err *err) {
    memset(m, 0, sizeof *m);
    pb_reader r = pb_make(buf, n);
    while (!pb_done(&r)) {
        uint32_t f;
        int wt;
        uint64_t v;
        const uint8_t *p;
        size_t len;
        TRY(pb_tag(&r, &f, &wt) ? bad(err, "ModelProto") : 0);
        if (f == 1 && wt == PB_VARINT) {
            if (pb_varint(&r, &v)) return bad(err, "ModelProto.ir_version");
            m->ir_version = (int64_t)v;
        } else if (f == 7 && wt == PB_LEN) {
            if (m->has_graph) return ea_fail(err, "malformed model.onnx: more than one graph");
            if (pb_len(&r, &p, &len)) return bad(err, "ModelProto.graph");
            m->has_graph = 1;
            TRY(parse_graph(p, len, m, err));
        } else if (f == 8 && wt == PB_LEN) {
            if (pb_len(&r, &p, &len)) return bad(err, "ModelProto.opset_import");
            onnx_opset *o = ea_push((void **)&m->opsets, &m->n_opsets, &m->cap_opsets, sizeof(onnx_opset));
            if (!o) return oom(err);
            pb_reader orr = pb_make(p, len);
            while (!pb_done(&orr)) {
                TRY(pb_tag(&orr, &f, &wt) ? bad(err, "OperatorSetIdProto") : 0);
                if (f == 1 && wt == PB_LEN) {
                    TRY(read_string(&orr, &o->domain, "OperatorSetIdProto.domain", err));
                } else if (f == 2 && wt == PB_VARINT) {
                    if (pb_varint(&orr, &v)) return bad(err, "OperatorSetIdProto.version");
                    o->version = (int64_t)v;
                } else if (pb_skip(&orr, wt)) return bad(err, "OperatorSetIdProto");
            }
            if (!o->domain && !(o->domain = ea_strndup("", 0))) return oom(err);
        } else if (f == 25 && wt == PB_LEN) {
            /* FunctionProto bodies (Steer's reference semantics): the runtime implements the ops natively. */
            if (pb_skip(&r, wt)) return bad(err, "ModelProto.functions");
            m->n_functions++;
        } else if (pb_skip(&r, wt)) return bad(err, "ModelProto");
    }
    if (!m->has_graph) return ea_fail(err, "model.onnx holds no graph (empty, truncated or not an ONNX model)");
    return 0;
}

void onnx_free(onnx_model *m) {
    for (int i = 0; i < m->n_opsets; i++) free(m->opsets[i].domain);
    for (int i = 0; i < m->n_nodes; i++) {
        onnx_node *nd = &m->nodes[i];
        for (int k = 0; k < nd->n_inputs; k++) free(nd->inputs[k]);
        for (int k = 0; k < nd->n_outputs; k++) free(nd->outputs[k]);
        for (int k = 0; k < nd->n_attrs; k++) {
            free(nd->attrs[k].name);
            free(nd->attrs[k].s);
            free(nd->attrs[k].ints);
            free(nd->attrs[k].floats);
        }
        free(nd->inputs);
        free(nd->outputs);
        free(nd->attrs);
        free(nd->name);
        free(nd->op_type);
        free(nd->domain);
    }
    for (int i = 0; i < m->n_inits; i++) {
        free(m->inits[i].name);
        free(m->inits[i].location);
        free(m->inits[i].owned);
    }
    for (int i = 0; i < m->n_inputs; i++) free(m->inputs[i].name);
    for (int i = 0; i < m->n_outputs; i++) free(m->outputs[i].name);
    free(m->opsets);
    free(m->nodes);
    free(m->inits);
    free(m->inputs);
    free(m->outputs);
    memset(m, 0, sizeof *m);
}
