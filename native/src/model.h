/* The loaded model: the ONNX graph checked against docs/model-folder.md and
 * turned into an execution plan (one step per executed node, weights bound,
 * activation buffers assigned to reusable slots). */
#ifndef EDGEACT_MODEL_H
#define EDGEACT_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "../include/edgeact.h"
#include "error.h"
#include "kernels/kernels.h"
#include "onnx.h"

typedef enum {
    V_ACT,       /* activation [S, width] float32 (dtype records an fp16 origin) */
    V_CONST,     /* initializer (or Cast of an fp16 initializer) */
    V_IDS,       /* input_ids */
    V_POSINFO,   /* seqlens_k / total_sequence_length: positions come from the session */
    V_PAST,      /* past_key_values.*: the session's KV cache */
    V_PRESENT,   /* present.*: written into the KV cache by GroupQueryAttention */
    V_SCORE      /* ffn_score.*: NeuronMask's per-neuron counts over a forward call, kept in the session */
} value_kind;

typedef struct value {
    const char *name;  /* borrowed from the onnx model */
    value_kind kind;
    int dtype;         /* ONNX dtype of the data as held (activations: always float32 storage) */
    int width;         /* activations: floats per token */
    int producer;      /* plan step index, -1 for inputs/initializers */
    int last_use;      /* last plan step reading it */
    int slot;          /* activation buffer slot */
    int is_graph_output;
    int hidden_layer;  /* i for hidden.{i}, else -1 */
    onnx_tensor *tensor; /* V_CONST */
    int cast_f16;      /* V_CONST: Cast(to=FLOAT) of an fp16 tensor (the matmul reads fp16) */
} value;

/* A float32 copy of an fp16 initializer read through Cast(to=FLOAT) where float32 data is
 * needed (block scales of MatMulNBits and GatherBlockQuantized; plan.c, ea_need_const), or a
 * constant the planner folded. One per source tensor; the buffer goes once nothing reads it:
 * right after its last reader is planned, or after the passes (plan.c, ea_model_build). */
typedef struct f32_copy {
    const onnx_tensor *src;
    onnx_tensor t; /* t.owned is the buffer, NULL once freed */
    int keep;      /* read by an op other than MatMulNBits: kept for the model's life */
    int folded;    /* src NULL: a constant the planner computed (plan.c, fold_div); t.name is its value's */
    int last_ref;  /* the last node reading it (through any Cast of src) */
    int early;     /* every reader is a MatMulNBits or lookup: it may go once the last one is planned */
    size_t mapped; /* bytes of an anonymous mapping holding t.owned, 0 for malloc */
} f32_copy;

/* One kind per line of ops/list.h. */
typedef enum {
#define EA_OP(KIND, name) OP_##KIND,
#include "ops/list.h"
#undef EA_OP
    OP_COUNT
} op_kind;

/* Sibling int4 matmuls reading one Sparsify output (q/k/v, gate/up): one channel-major copy
 * stacked along N, so a sparse decode step quantizes the active input once, wakes the pool once,
 * and k/v (too narrow alone to pay) ride along with q. Above the dense crossover each sibling
 * runs its own dense GEMV. A member's outputs start at its step's fuse_off. */
#define EA_FUSE_MAX 4
#define EA_ROW_THREADS_MAX EA_MAX_THREADS /* per-thread arrays of a session (ea_session_init) */
typedef struct fused_gemv {
    ea_qweight_cm cm;
    int n, step[EA_FUSE_MAX];
    int direct; /* the first member to run writes every member's output (mark_direct_fused) */
} fused_gemv;

/* One executed node. The first block is common; each op's plan (ops/) fills its own block,
 * and the passes (passes.c) the links between steps. Links to another step or group are
 * stored as 1 + its index, so that 0 (calloc) means none. */
/* Rows a sliding layer's cache keeps beyond its window (ops/gqa.c): ea_session_truncate may
 * go back this far, and a full cache moves its rows to the front once per this many tokens. */
#define EA_WINDOW_SLACK 32

typedef struct step {
    op_kind op;
    int node;             /* index into onnx nodes (the last one for fused steps) */
    const char *name, *op_type;
    int in[3], out;       /* value indexes (-1 unused) */
    int inplace;          /* out shares in[0]'s slot (assign_slots, where the op allows) */
    uint64_t weight_bytes; /* bytes one call reads (profile) */
    int layer;            /* GroupQueryAttention: cache index; Steer, NeuronMask: their layer */
    int K, N;             /* MatMul, MatMulNBits: shape; Gather: N = the embedding width */
    const float *w;       /* RMSNormalization: scale; Add of a bias: the bias */
    float eps;
    /* ops/gather.c */
    const void *table;
    int table_f16, vocab;
    /* ops/matmul.c */
    const float *Wf;
    const uint16_t *Wh;
    /* ops/matmul_nbits.c */
    ea_qweight qw;
    int qw_ready;
    int f32act;           /* accuracy_level 0..3: float activations, file layout (no repack) */
    /* float zero points (4-bit) as the weight's block minimums [N][n_blocks] (qw.minimums),
     * freed once a SIMD repack holds them (qw.has_minimums stays; the sparse copies read
     * them back from the repack: ea_qweight_row_minimums) */
    float *qmin;
    /* ops/gqa.c; window > 0: a sliding layer, whose cache is a ring of min(window, n_ctx) rows */
    int H, KVH, D, rotary;
    float scale, softcap;
    const float *cos, *sin;
    int max_pos, window;
    /* ops/steer.c: defaults (initializers), used when the session sets nothing */
    const float *def_add, *def_ablate;
    int def_R, def_add_zero, def_ablate_zero;
    /* ops/sparsify.c: threshold and column scale [K] (colsc NULL when all ones) */
    const float *thr, *colsc;
    int thr_step;         /* 0: one threshold thr[0] for every channel */
    /* ops/neuron_mask.c (CoreInfer): default mask [width] (ones) and the token-wise top-k of
     * its score */
    const float *def_mask;
    int token_k;
    /* passes.c, on MatMulNBits steps (read by sparse/):
     *  sparse_src  the Sparsify or NeuronMask feeding the input: its active channels are the
     *              input's nonzeros; a channel-major copy (cm, or the group's) serves them
     *  fuse        the stacked group holding this step's channel-major rows (then no cm), its
     *              rows from fuse_off
     *  dense_dropped  low memory: qw's repack freed; every row runs on the channel-major copy
     *  row_src     CoreInfer: the NeuronMask this gate/up feeds through SiLU-gate; with a mask
     *              set only the kept rows are computed
     *  rowsel_src  CATS: the Sparsify whose output multiplies this up_proj's; in decode only
     *              the rows it keeps are computed, from rows_qw (the file layout, copied to
     *              rows_buf; none: qw is it) */
    int sparse_src;
    ea_qweight_cm cm;
    int cm_ready;
    int fuse, fuse_off;
    int dense_dropped;
    int row_src;
    int rowsel_src;
    ea_qweight rows_qw;
    void *rows_buf;
} step;

struct ea_model {
    onnx_model onnx;
    void *map;            /* model.onnx bytes (mmap or owned copy) */
    size_t map_len;
    int map_owned;        /* 1: malloc'd copy, 0: mmap */
    struct ext_map *ext;  /* external data files, mapped once each */
    int n_ext;
    ea_isa isa;
    int n_values, n_steps, n_slots;
    value *values;
    step *steps;
    int *slot_width;
    int ids_value, logits_value, logits_step;
    int n_gqa, n_steer, n_hidden;
    int n_nmask, nmask_width; /* NeuronMask nodes (CoreInfer) and their width */
    int n_fused, max_fused_n;
    int sparse_always;    /* EDGEACT_SPARSE_ALWAYS=1: never hand a sparse GEMV to the dense kernel (tests) */
    int sparse_static;    /* EDGEACT_SPARSE_STATIC=1: the fixed crossover instead of the measured one */
    int sparse_lowmem;    /* EA_LOAD_SPARSE_LOWMEM or EDGEACT_SPARSE_LOWMEM=1: sparse matmuls keep only their
                           * channel-major copy */
    int no_kept_rows;     /* EDGEACT_NO_KEPT_ROWS=1: CoreInfer's gate/up on the rows kernel, never on kept-row
                           * copies (tests compare the two paths bit for bit) */
    fused_gemv *fused;
    int hidden, vocab, max_context, n_heads, n_kv_heads, head_dim;
    int max_act_width, max_q_width, max_kv_width;
    uint64_t bytes_mapped, bytes_copied, bytes_repacked;
    f32_copy **f32c;
    int n_f32c, cap_f32c;
    int n_op_types;
    const char *op_types[32];
    int op_counts[32];
};

/* err receives the message; returns an EA_ERR_* code. */
int ea_model_build(ea_model *m, const char *dir, ea_err *err);
void ea_model_destroy(ea_model *m);

#endif
