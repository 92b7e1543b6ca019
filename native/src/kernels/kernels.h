/* edgeact compute kernels: the one header the executor uses.
 *
 * Conventions:
 *  - Every kernel takes an ea_kctx (ISA + optional thread pool + scratch).
 *    One ea_kctx must not be used by two threads at once.
 *  - Functions returning int return EA_KOK (0) or a negative EA_KERR_*;
 *    ea_kernels_strerror() turns it into a one-line message.
 *  - Layouts are the ONNX ones of docs/model-folder.md; all float tensors are
 *    row-major fp32, fp16 is IEEE binary16 stored as uint16_t.
 *  - MatMulNBits semantics are onnxruntime's accuracy_level=4: each row of x
 *    is quantized to int8 per block of block_size along K (scale = absmax/127,
 *    round to nearest even), dotted in integers with the weights, then scaled.
 */
#ifndef EDGEACT_KERNELS_H
#define EDGEACT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "../threadpool.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ------------------------------------------------------ */
enum {
    EA_KOK = 0,
    EA_KERR_ISA_UNKNOWN = -1,     /* EDGEACT_ISA / name not one of the known ISAs */
    EA_KERR_ISA_UNAVAILABLE = -2, /* ISA known but not supported by this CPU/build */
    EA_KERR_ARG = -3,             /* bad shape, bits, block size, id out of range... */
    EA_KERR_NOMEM = -4,
    EA_KERR_LAYOUT = -5           /* weight prepared for another ISA than the ctx's */
};
const char *ea_kernels_strerror(int code);

/* ---- ISA selection ----------------------------------------------------- */
/* The kernel variants: each is one table of kernels (internal.h, ea_kernel_table) chosen
 * once per model; variants of one layout family share weight repacks. */
typedef enum {
    EA_ISA_SCALAR = 0,       /* the references (kernels/ref/) */
    EA_ISA_AVX2 = 1,         /* x86-64 AVX2 + FMA + F16C */
    EA_ISA_NEON = 2,         /* aarch64 baseline Advanced SIMD (smull/sadalp) */
    EA_ISA_NEON_DOTPROD = 3, /* aarch64 with the dot-product extension (sdot) */
    EA_ISA_AVX2_VNNI = 4,    /* AVX2 with AVX-VNNI (vpdpbusd) */
    EA_ISA_AVX512_VNNI = 5   /* AVX-512 F/BW/VL with VNNI */
} ea_isa;

/* Every variant this build has, best first (at most cap); the count. */
int ea_isa_list(ea_isa *out, int cap);
ea_isa ea_isa_detect(void);          /* the best variant this CPU runs */
int ea_isa_available(ea_isa isa);    /* 1 if this CPU and build can run it */
/* "scalar", "avx2", "avx2-vnni", "avx512-vnni", "neon", "neon-dotprod" */
const char *ea_isa_name(ea_isa isa);
/* The weight layout a variant reads: EA_ISA_AVX2 for the x86 variants, EA_ISA_NEON for the arm
 * ones, EA_ISA_SCALAR (the file layout). */
static inline ea_isa ea_isa_layout(ea_isa isa) {
    return isa == EA_ISA_AVX2_VNNI || isa == EA_ISA_AVX512_VNNI ? EA_ISA_AVX2
           : isa == EA_ISA_NEON_DOTPROD                         ? EA_ISA_NEON
                                                                : isa;
}
/* Parses an ISA name into *out; EA_KERR_ISA_UNKNOWN or EA_KERR_ISA_UNAVAILABLE. */
int ea_isa_parse(const char *name, ea_isa *out);
/* The variant a model runs: the name `forced` when non-NULL and non-empty (errors as
 * ea_isa_parse), else the best available one, skipping avx512-vnni when no_avx512 and the
 * VNNI variants when no_vnni (the settings EDGEACT_ISA, EDGEACT_NO_AVX512, EDGEACT_NO_VNNI). */
int ea_isa_choose(const char *forced, int no_avx512, int no_vnni, ea_isa *out);
/* ea_isa_choose with those settings read from the environment now (tests and tools). */
int ea_isa_select(ea_isa *out);

/* ---- kernel context ------------------------------------------------------ */
struct ea_kernel_table;
typedef struct ea_kctx {
    ea_isa isa;
    const struct ea_kernel_table *k; /* isa's kernels */
    ea_pool *pool;      /* borrowed; NULL runs everything on the caller */
    void *scratch;      /* owned, grown on demand (quantized activations, scores) */
    size_t scratch_cap;
    float *masked;      /* owned: ea_masked_qgemv's copy of x, all zeros between calls */
    size_t masked_cap;
} ea_kctx;

/* Fails with EA_KERR_ISA_UNAVAILABLE if isa cannot run here. */
int ea_kctx_init(ea_kctx *ctx, ea_isa isa, ea_pool *pool);
void ea_kctx_release(ea_kctx *ctx);

/* ---- blockwise quantized weights (com.microsoft.MatMulNBits) ------------ */
typedef struct ea_qweight {
    int K, N, bits, block_size, n_blocks; /* n_blocks = ceil(K / block_size) */
    /* The file layout, borrowed (e.g. pointers into the mmapped file):
     * data [N, n_blocks, block_size*bits/8], scales [N, n_blocks],
     * zero_points NULL (symmetric: 8 / 128) or 4-bit [N, ceil(n_blocks/2)]
     * low nibble first / 8-bit [N, n_blocks]. */
    const uint8_t *data;
    const float *scales;
    const uint8_t *zero_points;
    /* Float block minimums [N, n_blocks] (MatMulNBits' float zero points, as the value of
     * code 0: w = q*scale + minimum), or NULL. With minimums the codes have zero point 0 and
     * zero_points is NULL. has_minimums stays set when the owner drops its file-layout copy
     * once the SIMD repack holds them (then only a SIMD context runs the weight). */
    const float *minimums;
    int has_minimums;
    ea_isa isa;          /* ISA the weight was prepared for */
    void *packed;        /* owned SIMD repack (rows interleaved, scales fused), or NULL */
    size_t packed_bytes; /* bytes allocated by the repack (0 when in place) */
    int packed_f16;      /* the repack holds the scales as fp16 (every one is exact in fp16) */
    int packed_min_f16;  /* the repack holds the minimums as fp16 (every one is exact in fp16) */
} ea_qweight;

/* Bytes of a MatMulNBits weight in the file layout: B [N, blocks, block_size * bits / 8],
 * fp32 scales [N, blocks], zero points (int4: two blocks a byte, each row padded to a whole
 * byte; int8: one a block). The one place for these formulas (loader, copies, benchmark). */
typedef struct { size_t data, scales, zero_points; } ea_qbytes;
static inline ea_qbytes ea_qweight_file_bytes(size_t N, size_t n_blocks, int block_size, int bits) {
    ea_qbytes b;
    b.data = N * n_blocks * (size_t)(block_size * bits / 8);
    b.scales = sizeof(float) * N * n_blocks;
    b.zero_points = N * (bits == 4 ? (n_blocks + 1) / 2 : n_blocks);
    return b;
}

/* Validates the arguments (bits 4|8, block_size 32|64|128, K,N > 0) and, for a
 * SIMD isa, repacks the weight once into an owned buffer. The borrowed
 * pointers must outlive the ea_qweight (the scalar path reads them). */
int ea_qweight_init(ea_qweight *w, ea_isa isa, int K, int N, int bits, int block_size,
                    const uint8_t *data, const float *scales, const uint8_t *zero_points);
/* The same with float block minimums [N, n_blocks] (borrowed, finite) instead of integer zero
 * points: per block, y += sx*scale*dot(xq, q) + minimum * sx*sumx (ref/qmatmul.c). */
int ea_qweight_init_min(ea_qweight *w, ea_isa isa, int K, int N, int bits, int block_size,
                        const uint8_t *data, const float *scales, const float *minimums);
/* ea_qweight_init calling release(ctx, p, n) on each range of the file layout (data, scales,
 * zero points) the repack has read for the last time, a few MiB at a time: a caller whose
 * arrays are a mapped file gives their pages back on the way (ops/matmul_nbits.c), so the
 * weight is not resident twice while it is repacked. */
typedef void (*ea_qweight_release_fn)(void *ctx, const void *p, size_t n);
int ea_qweight_init_releasing(ea_qweight *w, ea_isa isa, int K, int N, int bits, int block_size,
                              const uint8_t *data, const float *scales, const uint8_t *zero_points,
                              ea_qweight_release_fn release, void *ctx);
void ea_qweight_release(ea_qweight *w);
/* Row n's float minimums, out[n_blocks]: from w->minimums, else from the SIMD repack (its
 * owner may drop the file-layout array once the repack holds them): for the sparse copies
 * made later. EA_KERR_ARG for a weight without minimums, or with neither copy. */
int ea_qweight_row_minimums(const ea_qweight *w, int n, float *out);

/* y[M, N] = MatMulNBits(x[M, K], w). M == 1 is the decode GEMV, M > 1 the
 * prefill GEMM (each weight block is reused across rows of x). Splits N over
 * the pool. EA_KERR_LAYOUT if w was prepared for a different SIMD family
 * layout than ctx->isa (a scalar ctx runs any weight). */
int ea_qmatmul(ea_kctx *ctx, const ea_qweight *w, const float *x, int M, float *y);

/* The same product at accuracy_level 0..3 (onnxruntime's CompFp32): float x
 * against (q - zero_point) * scale, or fma(q, scale, minimum), from the file layout, no activation
 * rounding. Any isa; the weight needs no repack (prepare it as scalar). */
int ea_qmatmul_f32act(ea_kctx *ctx, const ea_qweight *w, const float *x, int M, float *y);

/* The activation quantization ea_qmatmul applies, exposed for tests and the
 * sparse path: one row of K floats → xq [n_blocks*block_size] (tail zero),
 * sx [n_blocks] scales, sumx [n_blocks] sums of xq. Natural element order. */
int ea_quantize_act(ea_kctx *ctx, const float *x, int K, int block_size,
                    int8_t *xq, float *sx, int32_t *sumx);

/* ---- float matmuls (ONNX MatMul: W is [K, N]) -------------------------- */
int ea_matmul_f32(ea_kctx *ctx, const float *x, int M, int K, const float *W, int N, float *y);
int ea_matmul_f16(ea_kctx *ctx, const float *x, int M, int K, const uint16_t *W, int N, float *y);

/* ---- fp16 conversion ------------------------------------------------------ */
float ea_f16_to_f32(uint16_t h);
uint16_t ea_f32_to_f16(float f); /* round to nearest even, inf/nan kept */
void ea_f16_to_f32_row(const ea_kctx *ctx, const uint16_t *src, float *dst, size_t n);

/* ---- transformer pieces ------------------------------------------------ */
/* ONNX RMSNormalization over the last axis: y = x / sqrt(mean(x^2) + eps) * w.
 * x, y [rows, dim]; y may alias x. */
void ea_rmsnorm(const ea_kctx *ctx, const float *x, const float *w, int rows, int dim,
                float eps, float *y);

/* Non-interleaved rotary ("rotate_half") in place on x [S, H, head_dim]:
 * token s uses position pos0 + s; cos/sin caches [max_pos, head_dim/2].
 * EA_KERR_ARG if head_dim is odd or pos0 + S > max_pos. */
int ea_rope(const ea_kctx *ctx, float *x, int S, int H, int head_dim,
            const float *cos_cache, const float *sin_cache, int max_pos, int pos0);

/* Causal grouped-query attention over a KV cache.
 * q [S, H, hd] (already rotated); k_cache, v_cache [kv_heads, capacity, hd]
 * holding positions 0 .. pos0+S-1 (the S new keys already written, rotated).
 * Query s attends to positions 0 .. pos0+s; head h reads kv head
 * h / (H / kv_heads). out [S, H, hd]. Splits heads over the pool. */
int ea_attention(ea_kctx *ctx, const float *q, int S, int H, int hd,
                 const float *k_cache, const float *v_cache, int kv_heads, int capacity,
                 int pos0, float scale, float *out);

/* y = GELU(x), tanh form (Gelu approximate="tanh"); y may alias x. ea_gelu_tanh_scalar is the
 * reference every ISA's variant holds within 1e-6 (absolute, plus 1e-6 relative). */
void ea_gelu_tanh(const ea_kctx *ctx, const float *x, size_t n, float *y);
void ea_gelu_tanh_scalar(const float *x, size_t n, float *y);
/* y = silu(g) * u = g * sigmoid(g) * u (y may alias g or u); u NULL: y = silu(g). */
void ea_silu_mul(const ea_kctx *ctx, const float *g, const float *u, size_t n, float *y);
/* y = a + b elementwise, same length (y may alias a or b). */
void ea_add(const ea_kctx *ctx, const float *a, const float *b, size_t n, float *y);

/* Embedding gather: out[i, :] = table[ids[i], :]. EA_KERR_ARG if an id is
 * outside [0, vocab). */
int ea_embed_f32(const ea_kctx *ctx, const float *table, int vocab, int dim,
                 const int64_t *ids, int n, float *out);
int ea_embed_f16(const ea_kctx *ctx, const uint16_t *table, int vocab, int dim,
                 const int64_t *ids, int n, float *out);

/* ---- activation-sparse MatMulNBits ------------------------------------------
 * Results equal ea_qmatmul on x with the inactive entries zeroed, bit for
 * bit: blocks are quantized from their active entries only (zeros do not
 * move absmax and quantize to 0) and summed in the same order. */

/* Active fraction of K above which ea_sparse_qgemv hands over to the dense
 * kernel (the fixed rule; the runtime measures its choice, sparse/tune.h):
 * matrices with short channel-major rows (N < EA_SPARSE_LONG_N) stop paying
 * near 60% active, long ones near 70% (docs/performance.md, "fixed crossover"). */
#define EA_SPARSE_DENSE_CROSSOVER 0.65f
#define EA_SPARSE_SHORT_CROSSOVER 0.55f
#define EA_SPARSE_LONG_N 4096
/* Below this many outputs ea_sparse_qgemv runs the dense kernel (when given):
 * with a few 64-row tiles per thread the per-block work dominates
 * (docs/performance.md, "EA_SPARSE_MIN_N"). */
#define EA_SPARSE_MIN_N 512
/* EDGEACT_SPARSE_STATIC's rule for ea_qgemv_rows (CATS up_proj): below this share of the
 * rows it beats the dense GEMV, given N >= EA_SPARSE_MIN_N (docs/performance.md, "output rows") */
#define EA_ROWS_STATIC_SHARE 0.5f
/* Fraction of output rows above which ea_qgemv_rows is slower than the
 * dense GEMV; the caller chooses, since the dense kernel also writes the
 * unlisted rows. */
#define EA_ROWS_DENSE_CROSSOVER 0.55f

/* Channel-major copy of an int4 ea_qweight: for each input channel k the N
 * nibbles contiguous, scales and zero points (or float minimums) as
 * [n_blocks, n_pad] in the kernel's lane order. Owns its memory (bytes); the
 * source may be released. */
typedef struct ea_qweight_cm {
    int K, N, n_pad, block_size, n_blocks;
    ea_isa isa;
    uint8_t *data;        /* [n_blocks*block_size, n_pad/2] */
    void *scales;         /* [n_blocks, n_pad] float, or fp16 when scales_f16 */
    int scales_f16;       /* every scale is exact in fp16 (as in the dense repack) */
    uint8_t *zero_points; /* [n_blocks, n_pad], NULL when symmetric (8) or with minimums (0) */
    void *minimums;       /* [n_blocks, n_pad] float, fp16 when minimums_f16; NULL without */
    int minimums_f16;     /* every minimum is exact in fp16 */
    size_t bytes;
} ea_qweight_cm;

/* Zeroed, 64-byte aligned memory for a weight repack or copy (huge pages where the
 * OS offers them: isa.c); free() releases it. */
void *ea_alloc_weights(size_t bytes);

/* EA_KERR_ARG unless w is int4. */
int ea_qweight_cm_init(ea_qweight_cm *cm, ea_isa isa, const ea_qweight *w);
/* One channel-major copy of the int4 weights ws[0..n_w) stacked along N (same
 * K, block size, zero-point and minimum presence, else EA_KERR_ARG): sibling matmuls
 * reading one sparse input (q/k/v, gate/up) run as one GEMV, whose outputs
 * are theirs in order. Each row's result equals its own weight's. */
int ea_qweight_cm_init_concat(ea_qweight_cm *cm, ea_isa isa, const ea_qweight *const *ws, int n_w);
void ea_qweight_cm_release(ea_qweight_cm *cm);

/* y[N] = MatMulNBits(x masked to the channels in active[0..n_active)), M = 1.
 * active: strictly increasing indices in [0, K). Reads only the weights of
 * active channels. When dense != NULL (the same weight in row layout, for
 * ctx->isa) and n_active is above the crossover share of K (EA_SPARSE_DENSE_CROSSOVER,
 * EA_SPARSE_SHORT_CROSSOVER when N < EA_SPARSE_LONG_N) or N < EA_SPARSE_MIN_N,
 * runs the dense kernel on the masked x instead (same result). */
int ea_sparse_qgemv(ea_kctx *ctx, const ea_qweight_cm *cm, const ea_qweight *dense, const float *x,
                    const int32_t *active, int n_active, float *y);
/* ea_sparse_qgemv (sparse path only) on a stacked copy whose members' rows go to
 * their own outputs: outs[i] gets ns[i] rows (sum of ns = cm->N, else EA_KERR_ARG),
 * each row copied by the thread that computed it; scratch holds cm->n_pad floats. */
int ea_sparse_qgemv_split(ea_kctx *ctx, const ea_qweight_cm *cm, const float *x, const int32_t *active,
                          int n_active, float *scratch, float *const *outs, const int *ns, int n_outs);
/* 1 when the dense kernel beats the sparse one on cm for n_active channels
 * (the crossover rule above). */
int ea_sparse_prefers_dense(const ea_qweight_cm *cm, int n_active);
/* The dense GEMV of w on x masked to active[0..n_active) (strictly increasing). */
int ea_masked_qgemv(ea_kctx *ctx, const ea_qweight *w, const float *x, const int32_t *active, int n_active, float *y);

/* ai.edgeact.Sparsify on one row of n: y[k] = x[k] where |x[k]|*col_scale[k] >=
 * thr[k], else 0 (NaN is dropped: the comparison is false); active gets the
 * kept k ascending. Returns their count. y may alias x. thr_step 0: one
 * threshold thr[0] for all k; col_scale NULL: all ones (TEAL reads only x,
 * where two per-channel arrays streamed from memory were most of the time). */
int ea_sparsify(const ea_kctx *ctx, const float *x, const float *thr, int thr_step, const float *col_scale, int n,
                float *y, int32_t *active);

/* Gated-FFN side: computes only the output rows rows[0..n_rows) (strictly
 * increasing) of MatMulNBits(x, w), M = 1, from the file row layout; other
 * entries of y are left untouched. Same values as ea_qmatmul's. EA_KERR_ARG for a
 * weight with float minimums whose file-layout copy of them is gone. */
int ea_qgemv_rows(ea_kctx *ctx, const ea_qweight *w, const float *x, const int32_t *rows, int n_rows,
                  float *y);

#ifdef __cplusplus
}
#endif
#endif
