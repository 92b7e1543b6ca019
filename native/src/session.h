#ifndef EDGEACT_SESSION_H
#define EDGEACT_SESSION_H

#include "model.h"
#include "sparse/tune.h"

struct ea_session {
    ea_model *m;
    ea_pool *pool;
    ea_kctx kctx;
    int n_threads, n_ctx, max_chunk, n_past;
    float **slots;          /* [n_slots][max_chunk * slot_width] */
    int64_t *ids;           /* one chunk of token ids */
    float *qbuf, *kbuf;     /* rotated queries / keys of one chunk */
    float **k_cache, **v_cache; /* per GQA node: [kv_heads, ea_gqa_capacity rows, head_dim] */
    int *kv_base;           /* per GQA node: the position its cache row 0 holds (sliding layers move it) */
    int window_lost;        /* a failed forward moved a sliding layer's cache past the rows its next query
                             * needs: only a forward from position 0 runs (after a reset) */
    int fail_at, steps_run; /* ea_session_inject_failure: the next forward's executed step fail_at (from 1)
                             * fails; steps_run counts them */
    float **steer_add, **steer_ablate; /* per steering layer, NULL when unset */
    int *steer_R;
    float *coef;            /* ablation coefficients of one row */
    int capture, hidden_tokens;
    float *hidden_buf;      /* [n_hidden, hidden_tokens, hidden] */
    size_t hidden_cap;
    int profile;
    int *exec_steps;        /* the plan steps that run, in order */
    int n_exec;
    uint64_t *prof_ns, *prof_calls, *prof_bytes; /* per exec step */
    uint64_t *prof_active, *prof_total;          /* per exec step: Sparsify channels kept / seen */
    int32_t **active;       /* per plan step (Sparsify, NeuronMask): active channels of the last row */
    int *n_active;
    /* CoreInfer, per NeuronMask layer: the mask set by the caller (NULL = the model's default, all on)
     * and the scores of the last forward call (counted while the mask is unset). The mask's nonzero
     * channels are the NeuronMask step's active list. */
    float **nmask, **nscore;
    float *sel;             /* |h| of one row and the scratch of its k-th largest (2 x width) */
    /* per plan step (gate/up behind a NeuronMask): the kept rows of its weight, repacked when the
     * mask is set so a decode step runs the dense GEMV on them; its file-layout source bytes */
    ea_qweight *kept;
    uint8_t **kept_src;     /* the gathered rows; only their scales and zero points once repacked (SIMD) */
    int *has_kept;
    float *kept_y;          /* one row of kept outputs before the scatter */
    float *fused_y;         /* one row of a fused_gemv's outputs, computed by the first member to run;
                             * with row_ctx one such row per thread (sparse_rows' scratch) */
    int32_t *rows_active;   /* the nonzero channels of one prompt row (max_act_width + 1), one per
                             * thread with row_ctx (sparse_rows) */
    float *rows_fused;      /* low memory: a stacked group's prompt rows when its members share outputs */
    size_t rows_fused_cap;  /* floats */
    int rows_owner;         /* 1 + the fused_gemv whose prompt rows this chunk are computed, 0 = none */
    ea_kctx *row_ctx;       /* with a pool and channel-major copies: one poolless kernel context per
                             * thread, for prompt rows on the channel-major copy (sparse_rows) */
    /* the measured choice of prompt chunks behind a Sparsify (the dense GEMM or sparse_rows), per
     * unit as tune; a group's choice and time this chunk */
    ea_sparse_tune *ptune;
    size_t llc_bytes;       /* last-level cache (platform.h): the prompt-rows path's bound */
    int8_t *punit_path;
    uint64_t *punit_ns;
    int fused_owner;        /* 1 + the fused_gemv fused_y holds this token, 0 = none */
    /* the measured sparse/dense choice of decode GEMVs behind a Sparsify, per unit: fused group g
     * at g, a lone sparse step si at n_fused + si; a group's choice and time of this token */
    ea_sparse_tune *tune;
    int8_t *unit_sparse;    /* per fused group: -1 undecided this token, else the path taken */
    uint64_t *unit_ns;      /* per fused group: its members' time so far this token */
    uint64_t *prof_sparse, *prof_eligible; /* per exec step: decode calls on the input-sparse GEMV, and
                                            * calls that had the choice */
};

/* Rows of a GroupQueryAttention step's cache for a session of n_ctx (ops/gqa.c). */
int ea_gqa_capacity(const step *st, int n_ctx);
/* CoreInfer: rebuild / drop the kept-row copies of gate/up for a NeuronMask layer (sparse/kept.c). */
int ea_session_prepare_kept(ea_session *ss, int layer);
void ea_session_drop_kept(ea_session *ss, int si);

#endif
