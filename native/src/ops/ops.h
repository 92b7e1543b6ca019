/* The op interface. Each op the runtime executes is one file in ops/ with two functions:
 *
 *   plan  at load, for one ONNX node: check attributes, inputs and shapes (a clear error
 *         through ea_node_fail, never a crash), bind weights and fill the step's fields
 *         that the op reads, declare the outputs (ea_add_output).
 *   run   per chunk of tokens: compute the step's output rows from its bound inputs.
 *
 * ops/list.h lists them; ops/table.c maps ONNX (domain, op type) to an entry. Graph-level
 * rewrites that look at more than one node (fusion, stacked groups, CoreInfer and CATS
 * links, buffer slots) are in passes.c, not in the ops. */
#ifndef EDGEACT_OPS_H
#define EDGEACT_OPS_H

#include "../model.h"
#include "../session.h"

/* ---- planning: the builder's view of the graph ------------------------------------------ */
typedef struct ea_planner ea_planner;
struct ea_planner {
    ea_model *m;
    ea_err *err;
    struct {
        int cap;
        int *idx;
    } nm; /* value name -> index (open addressing) */
    int cap_values;
};

/* "node 'NAME' (DOMAIN.OP): detail"; returns -1. */
int ea_node_fail(ea_planner *b, const onnx_node *nd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
#define NODE_FAIL(...) return ea_node_fail(b, nd, __VA_ARGS__)

/* Attributes: absent -> def (or an error when required); a wrong type or a non-finite float
 * is an error. ea_check_attrs rejects any attribute not in the NULL-terminated `known`
 * (silently ignoring one could change results). */
int ea_attr_int(ea_planner *b, const onnx_node *nd, const char *name, int64_t def, int required, int64_t *out);
int ea_attr_float(ea_planner *b, const onnx_node *nd, const char *name, float def, float *out);
int ea_check_attrs(ea_planner *b, const onnx_node *nd, const char *const *known);
/* Input k's value index in *out (-1 when optional and absent). */
int ea_get_input(ea_planner *b, const onnx_node *nd, int k, int required, int *out);
/* Input k must be a computed activation. */
int ea_need_act(ea_planner *b, const onnx_node *nd, int k, int v);
/* Input k must be an initializer of dtype (0: any) and ndim dims (-1: any); NULL after an error. */
const onnx_tensor *ea_need_const(ea_planner *b, const onnx_node *nd, int k, int v, int dtype, int ndim);
int ea_numel(const onnx_tensor *t); /* -1 above INT32_MAX */
int ea_check_dim(ea_planner *b, const onnx_node *nd, int64_t d, const char *what);
/* Declares output k produced by step si; returns its value index or -1. */
int ea_add_output(ea_planner *b, const onnx_node *nd, int k, value_kind kind, int dtype, int width, int si);
/* Outputs from n on must be absent. */
int ea_only_outputs(ea_planner *b, const onnx_node *nd, int n);
/* The layer a per-layer op (Steer, NeuronMask) serves: the number in its initializer's name
 * (fmt, e.g. "steer.%d.add%c"), else its order among that op's nodes; one node per layer. */
int ea_op_layer(ea_planner *b, const onnx_node *nd, int si, op_kind op, const char *init_name, const char *fmt,
                int order, int *layer);

/* ---- running: one step over one chunk ---------------------------------------------------- */
typedef struct ea_exec {
    ea_session *ss;
    const step *st;
    int si, e;          /* the plan step, and its index among executed steps (profile arrays) */
    int S, pos0;        /* tokens in the chunk; position of the first */
    int last_only;      /* only the last row is needed (the logits step of a decode call) */
    const float *a, *b; /* inputs 0 and 1 when they are activations, else NULL */
    float *y;           /* the output when it is an activation, else NULL */
    int w;              /* output width */
    size_t n;           /* S * w */
    int rows;           /* rows of y written; an op that computes only the last row sets 1 */
    uint64_t bytes;     /* weight bytes read (profile); starts as st->weight_bytes */
} ea_exec;

typedef struct ea_op {
    const char *domain;  /* "" (the standard domain, also spelled "ai.onnx"), "com.microsoft",
                          * "ai.edgeact"; NULL for ops that only passes make */
    const char *op_type;
    /* Fills st (st->node, name, in/out preset) for node nd; may set st->op to another kind
     * (Cast of a weight: OP_NOP; Add of a bias: OP_ADD_BIAS). Returns 0 or -1. */
    int (*plan)(ea_planner *b, const onnx_node *nd, step *st);
    int (*run)(ea_exec *x); /* EA_KOK or an EA_KERR_* code */
    int inplace;            /* may write its output over input 0 when that dies here */
} ea_op;

#define EA_OP(KIND, name) extern const ea_op ea_op_##name;
#include "list.h"
#undef EA_OP
extern const ea_op *const ea_ops[OP_COUNT];
/* The kind whose entry plans (domain, op_type), or -1. */
int ea_op_find(const char *domain, const char *op_type);
/* "Gather, Cast, ..., ai.edgeact.NeuronMask": the ops a graph may use (error messages). */
void ea_op_supported(char *list, size_t cap);

uint64_t ea_now_ns(void);

#endif
