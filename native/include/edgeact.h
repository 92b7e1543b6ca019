/* edgeact native runtime: the public C API.
 *
 * Opaque handles, plain C types, no callbacks, so cffi, JNI or any FFI can
 * call it. Every function returning int returns EA_OK (0) or a negative
 * EA_ERR_*; the one-line message of the last failure on the calling thread
 * is ea_last_error(). A model is immutable after loading and may be shared
 * by sessions on different threads; one session must not be used by two
 * threads at once.
 *
 * The lines between "cdef-begin" and "cdef-end" are read verbatim by the
 * cffi build (runtime/build_ffi.py): keep them free of preprocessor lines. */
#ifndef EDGEACT_H
#define EDGEACT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
enum {
    EA_OK = 0,
    EA_ERR_IO = -1,       /* file missing, unreadable, not mappable */
    EA_ERR_FORMAT = -2,   /* malformed protobuf, bad tensor, unknown op, bad graph */
    EA_ERR_ARG = -3,      /* bad argument: token id, steering vector, layer, sizes */
    EA_ERR_CONTEXT = -4,  /* the tokens do not fit in the session's n_ctx */
    EA_ERR_NOMEM = -5,
    EA_ERR_KERNEL = -6,   /* a kernel rejected its arguments or the ISA is unavailable */
    EA_ERR_STATE = -7     /* e.g. hidden states requested while capture is off */
};

typedef struct ea_model ea_model;
typedef struct ea_session ea_session;

typedef struct ea_model_info {
    int n_layers;        /* GroupQueryAttention nodes */
    int hidden;          /* residual stream width */
    int vocab;
    int max_context;     /* rows of the rotary caches */
    int n_heads, n_kv_heads, head_dim; /* head_dim as in the graph (padded) */
    int n_nodes;         /* graph nodes */
    int n_steer_layers;  /* Steer nodes (0 when the folder was written without steering) */
    int n_mask_layers;   /* NeuronMask nodes (CoreInfer; 0 otherwise) */
    int mask_width;      /* their width (the FFN intermediate size) */
    const char *isa;     /* kernel variant in use: "scalar", "avx2", "avx2-vnni", "avx512-vnni", "neon",
                          * "neon-dotprod" (docs/runtime.md) */
    uint64_t weight_bytes_mapped;   /* initializer bytes used in place from the file maps */
    uint64_t weight_bytes_copied;   /* copied: misaligned tensors and vectors (norms, biases) */
    uint64_t weight_bytes_repacked; /* owned SIMD repacks of quantized weights */
} ea_model_info;

typedef struct ea_profile_record {
    const char *name;     /* node name (fused nodes carry the last node's name) */
    const char *op_type;  /* ONNX op type, or "SiluMul" for the fused Sigmoid/Mul/Mul */
    uint64_t calls;
    uint64_t ns;          /* wall time summed over calls */
    uint64_t weight_bytes; /* weight bytes read, summed over calls */
    uint64_t active, total; /* Sparsify: channels kept and channels seen (realized sparsity = 1 - active/total) */
    uint64_t sparse_calls; /* MatMulNBits behind a Sparsify: decode calls that ran the input-sparse GEMV */
    uint64_t sparse_eligible; /* ... of its decode calls that could (the others ran the dense GEMV on the
                               * masked input, measured faster) */
} ea_profile_record;

const char *ea_last_error(void);
const char *ea_version(void);

/* Loads DIR/model.onnx (external data resolved only inside DIR). */
int ea_model_load(const char *dir, ea_model **out);
/* Load options (flags of ea_model_load_opts). */
enum {
    /* Matmuls behind a Sparsify keep only their channel-major copy (no dense repack): every row,
     * prefill included, runs the input-sparse GEMV. Less memory, slower prefill. Also set by the
     * environment variable EDGEACT_SPARSE_LOWMEM=1. */
    EA_LOAD_SPARSE_LOWMEM = 1
};
/* ea_model_load with EA_LOAD_* flags (unknown bits: EA_ERR_ARG). */
int ea_model_load_opts(const char *dir, unsigned flags, ea_model **out);
/* Loads a model from memory (the buffer is copied); external data, if any, is resolved in dir
 * (NULL: external data is an error). For tests and fuzzing. */
int ea_model_load_buffer(const void *data, size_t n, const char *dir, ea_model **out);
void ea_model_free(ea_model *model);
int ea_model_get_info(const ea_model *model, ea_model_info *info);
/* Op types with their node counts, index in [0, ea_model_n_op_types). */
int ea_model_n_op_types(const ea_model *model);
int ea_model_op_type(const ea_model *model, int index, const char **op_type, int *count);

/* The most threads a session takes. */
#define EA_MAX_THREADS 256

/* n_threads <= 0: one per physical core (at most EA_MAX_THREADS); n_ctx <= 0: min(max_context, 4096);
 * max_chunk <= 0: 64 tokens per prefill chunk (longer prompts run in chunks). */
int ea_session_create(ea_model *model, int n_threads, int n_ctx, int max_chunk, ea_session **out);
void ea_session_free(ea_session *session);
int ea_session_n_ctx(const ea_session *session);
int ea_session_n_past(const ea_session *session);
int ea_session_n_threads(const ea_session *session);
/* Forgets the cache (n_past = 0); steering, capture and profiling settings stay. */
int ea_session_reset(ea_session *session);
/* Keeps the first n_past cached tokens (0 <= n_past <= the current n_past), so that a conversation
 * whose prefix diverged continues from their common part. */
int ea_session_truncate(ea_session *session, int n_past);
/* Bytes the session owns for its KV cache (sized for n_ctx) and activation buffers (the weights are
 * the model's, shared by its sessions). */
uint64_t ea_session_memory_bytes(const ea_session *session);
/* Appends n tokens at positions n_past .. n_past+n-1. all_logits: logits [n, vocab];
 * otherwise [vocab] for the last token only. On error the session keeps its n_past tokens and
 * the next call computes as if the failed one had not happened; only when the failed call had
 * moved a sliding-window layer's cache past the window of position n_past does every further
 * call fail (EA_ERR_STATE, the error says so) until ea_session_reset. */
int ea_session_forward(ea_session *session, const int64_t *ids, int n, float *logits, int all_logits);

/* Steering after layer `layer` (index i of steer.{i}): y = h - (h A^T) A + add.
 * add [hidden] or NULL, ablate [R, hidden] or NULL (R ignored). Values must be finite. */
int ea_session_set_steering(ea_session *session, int layer, const float *add, const float *ablate, int R);
/* layer -1 clears every layer. */
int ea_session_clear_steering(ea_session *session, int layer);

/* CoreInfer (ai.edgeact.NeuronMask, layer = i of ffn_mask.{i}): mask [mask_width] replaces the
 * model's default (NULL restores it); the FFN computes only the rows and columns where mask != 0.
 * Values must be finite. reset() keeps masks. */
int ea_session_set_neuron_mask(ea_session *session, int layer, const float *mask, int n);
/* Per-channel counts of the last forward call's tokens whose |h| reached their token-wise top-k
 * (ffn_score.{i}); counted only while that layer's mask is unset. n must be mask_width. */
int ea_session_get_neuron_scores(const ea_session *session, int layer, float *out, int n);

/* Hidden-state capture: when on, each forward keeps hidden.{i} of all its tokens. */
int ea_session_capture_hidden(ea_session *session, int on);
/* Tokens held by the capture buffer (the last forward's n). */
int ea_session_hidden_tokens(const ea_session *session);
/* Copies [n_layers, tokens, hidden] floats into out (n_floats must be at least that). */
int ea_session_get_hidden(const ea_session *session, float *out, size_t n_floats);

int ea_session_profile(ea_session *session, int on);
int ea_session_profile_reset(ea_session *session);
/* Records, one per executed node, in execution order. */
int ea_session_profile_count(const ea_session *session);
int ea_session_profile_get(const ea_session *session, int index, ea_profile_record *out);

/* Physical cores (distinct package/core pairs): the default thread count. */
int ea_physical_cores(void);
/* The kernel variant a model loaded now would run ("avx512-vnni", "avx2", "neon-dotprod", ...:
 * EDGEACT_ISA's, or the best this CPU has), NULL when EDGEACT_ISA names one it lacks. */
const char *ea_default_isa(void);
/* cdef-end */

#ifdef __cplusplus
}
#endif
#endif
