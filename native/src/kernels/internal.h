/* Private declarations shared by the kernel translation units. */
#ifndef EDGEACT_KERNELS_INTERNAL_H
#define EDGEACT_KERNELS_INTERNAL_H

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#define EA_X86 1
#endif
#if defined(__aarch64__)
#define EA_ARM64 1
#include <arm_neon.h>
/* gcc 12's arm_neon.h wraps vdotq_s32 in arch=armv8.2-a+dotprod and rejects
 * inlining it into a plain "+dotprod" function; clang spells it "dotprod". */
#if defined(__clang__)
#define EA_TARGET_DOTPROD __attribute__((target("dotprod")))
#else
#define EA_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#endif

/* Rows of W interleaved per group in the SIMD repack (and the unit of the
 * integer reduction). */
#define EA_QROWS 8
/* Software prefetch distance (bytes) in the packed weight stream: one core
 * alone does not keep enough lines in flight to saturate DRAM with the
 * hardware prefetcher only (docs/performance.md, "software prefetch").
 * membw.c's probe uses the same distance. */
#define EA_QPREFETCH 4096
/* N is split across threads in multiples of this many rows (64-byte output lines). */
#define EA_NCHUNK 16
/* Tasks per pool thread for the matmuls (dynamic claiming balances preemption). */
#define EA_TASKS_PER_THREAD 4

/* Whether every one of n scales is exactly representable in fp16. */
int ea_scales_exact_in_f16(const float *s, size_t n);

/* Scratch from the ctx, grown on demand; NULL when out of memory. */
void *ea_scratch(ea_kctx *ctx, size_t bytes);

/* The quantized activations of M rows, laid out for the kernels. */
typedef struct {
    int M, K, block_size, n_blocks;
    int8_t *xq;    /* [M, n_blocks*block_size] */
    float *sx;     /* [M, n_blocks] */
    int32_t *sumx; /* [M, n_blocks] */
} ea_qact;

/* Row r of the quad of listed rows after the one at i (its first row past a short end, the
 * quad at i's first when none follows): what the output-row kernels prefetch. */
static inline int ea_next_quad_row(const int32_t *rows, int n_rows, int i, int r) {
    return rows[i + 4 + r < n_rows ? i + 4 + r : i + 4 < n_rows ? i + 4 : i];
}

/* The SIMD repack. A group of EA_QROWS rows is n_blocks blocks; one block is
 *   data   [subs][EA_QROWS rows][16 bytes]   (subs = block_size*bits/8/16)
 *   scales [EA_QROWS] float, in lane order; fp16 when every scale of the
 *          weight is exact in fp16 (packed_f16): the same values in 2 of the
 *          ~20 bytes per row and block, which decode reads from DRAM
 *   zp     [EA_QROWS] uint8, in lane order (asymmetric weights only), or
 *   min    [EA_QROWS] float minimums, in lane order (weights with float
 *          minimums), fp16 when every one is exact in fp16 (packed_min_f16:
 *          Q4_1 and Q4_K sources), so a row's block costs 4 bytes over its
 *          codes, as in llama.cpp's Q4_1
 * Two rows' 16-byte pieces are adjacent so AVX2 reads them with one 32-byte
 * load. "Lane order" is the order in which a kernel's integer reduction
 * leaves the rows (ea_qpack_lane_row), so scales apply without shuffles. */
static inline size_t ea_qpack_scale_size(int f16) { return f16 ? 2 : sizeof(float); }
#if EA_ARM64
/* Four scales stored as fp32, or as fp16 when f16 (exact either way); ea_load8_scales on AVX2. */
static inline float32x4_t ea_load4_scales(const uint8_t *p, int f16) {
    return f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p))) : vld1q_f32((const float *)p);
}
#endif
/* Where a block's zero points or minimums start (after its scales). */
static inline size_t ea_qpack_zp_offset(const ea_qweight *w) {
    return EA_QROWS * ((size_t)w->block_size * (size_t)w->bits / 8) + EA_QROWS * ea_qpack_scale_size(w->packed_f16);
}
static inline size_t ea_qpack_block_stride(const ea_qweight *w) {
    return ea_qpack_zp_offset(w) + (w->zero_points ? EA_QROWS
                                    : w->has_minimums ? EA_QROWS * ea_qpack_scale_size(w->packed_min_f16)
                                                   : 0);
}

/* Row (within its group) whose result lands in reduction lane `lane`. */
static inline int ea_qpack_lane_row(ea_isa isa, int lane) {
    /* AVX2: hadd of [r0|r1],[r2|r3],[r4|r5],[r6|r7] yields r0 r2 r4 r6 | r1 r3 r5 r7 */
    static const int avx2[EA_QROWS] = {0, 2, 4, 6, 1, 3, 5, 7};
    return ea_isa_layout(isa) == EA_ISA_AVX2 ? avx2[lane] : lane;
}

/* Zero point of (row n, block b) from the file layout. */
static inline int ea_qweight_zp(const ea_qweight *w, int n, int b) {
    if (w->has_minimums) return 0;
    if (!w->zero_points) return w->bits == 4 ? 8 : 128;
    if (w->bits == 8) return w->zero_points[(size_t)n * w->n_blocks + b];
    uint8_t byte = w->zero_points[(size_t)n * ((w->n_blocks + 1) / 2) + b / 2];
    return (b & 1) ? byte >> 4 : byte & 15;
}

/* ---- sparse kernels ---- */
/* Quads of active channels the AVX2 and AVX-512 kernels stream at once. */
#ifndef EA_SPARSE_CHUNK_QUADS
#define EA_SPARSE_CHUNK_QUADS 3
#endif
/* A block's quads [q0, q1) go in chunks whose rows stream together (a
 * 128-channel block at 50% would otherwise be 64 rows at once); qn ends the
 * next block's quads. The chunk from c0 ends at c1; [p0, p1) is the chunk
 * after it to prefetch: the rest of this block, or the next block's first. */
typedef struct { int c1, first, last, p0, p1; } ea_sparse_chunk;
static inline ea_sparse_chunk ea_sparse_chunk_at(int q0, int q1, int qn, int c0) {
    ea_sparse_chunk c;
    c.c1 = c0 + EA_SPARSE_CHUNK_QUADS < q1 ? c0 + EA_SPARSE_CHUNK_QUADS : q1;
    c.first = c0 == q0;
    c.last = c.c1 == q1;
    c.p0 = c.c1;
    const int end = c.last ? qn : q1;
    c.p1 = c.p0 + EA_SPARSE_CHUNK_QUADS < end ? c.p0 + EA_SPARSE_CHUNK_QUADS : end;
    return c;
}

/* How far ahead, in tiles, the kernels prefetch the rows they stream. */
#ifndef EA_SPARSE_PF_TILES
#define EA_SPARSE_PF_TILES 12
#endif
/* What to prefetch at tile t of chunk ch (quads from c0) over the thread's
 * tiles [t0, t1): the chunk's own rows at tile t + EA_SPARSE_PF_TILES or,
 * past t1, the next chunk's at the tiles it starts with. A fixed distance:
 * the next chunk at tile t runs a whole pass ahead, on wide matrices
 * (gate/up stacked: 44 tile pairs per thread) hundreds of lines waiting in
 * L1 beside the accumulators, likely evicted before use (docs/performance.md,
 * "prefetch distance"). Threads with fewer tiles than the distance prefetch
 * the next chunk at tile t. */
typedef struct { int t, q0, q1; } ea_sparse_pf;
static inline ea_sparse_pf ea_sparse_pf_at(ea_sparse_chunk ch, int c0, int t, int t0, int t1) {
    ea_sparse_pf p = {t + EA_SPARSE_PF_TILES, c0, ch.c1};
    if (EA_SPARSE_PF_TILES >= t1 - t0) p.t = t;
    else if (p.t < t1) return p;
    else p.t -= t1 - t0;
    p.q0 = ch.p0;
    p.q1 = ch.p1;
    return p;
}

/* Output rows per tile of the channel-major layout: 32 bytes of nibbles. */
#define EA_CM_TILE 64

/* Row (within its 64-row tile) whose result lands in lane `lane` after the
 * kernel widens its int16 accumulators (the nibbles of a channel are in
 * natural order: n even in the low nibble, n odd in the high one). */
static inline int ea_cm_lane_n(ea_isa isa, int lane) {
    const int v = lane / 8, j = lane % 8;
    if (ea_isa_layout(isa) == EA_ISA_AVX2) { /* vector v: tile bytes 4i..4i+3 and 16+4i.. (i = v/2); low (v even) or high nibble */
        const int byte = 4 * (v / 2) + (j < 4 ? j : 12 + j);
        return 2 * byte + (v & 1);
    }
    if (ea_isa_layout(isa) == EA_ISA_NEON) { /* per 32-row half: even 0..30 then odd 1..31 */
        const int h = lane / 32, u = lane % 32 / 4, i = lane % 4;
        return 32 * h + (u >= 4 ? 1 : 0) + (u % 4) * 8 + 2 * i;
    }
    return lane;
}

/* Quantized active entries of x, grouped by block (blocks ascending). */
typedef struct {
    int n_blocks;   /* blocks with a nonzero quantized entry */
    int32_t *blk;   /* [n_blocks] block index */
    int32_t *start; /* [n_blocks + 1] ranges into ch / q */
    float *sx;      /* [n_blocks] */
    int32_t *sumx;  /* [n_blocks] */
    int32_t *ch;    /* channel of each nonzero quantized entry */
    int8_t *q;      /* its value */
    float *acc;     /* [n_pad] per-row accumulators in lane order (threads own disjoint tiles) */
    int32_t *dacc;  /* [n_pad] a block's integer sums between chunks (AVX2, AVX-512) */
    /* AVX2, AVX-512: the entries of each block in quads (the last padded with value 0) */
    int32_t *qstart; /* [n_blocks + 1] ranges into qoff / qx */
    size_t *qoff;    /* [4 per quad] byte offset of each channel's row */
    int32_t *qx;     /* [per quad] the four int8 values, first channel in the low byte */
} ea_sparse_act;

/* Scale i, minimum i of a channel-major weight. */
static inline float ea_cm_scale(const ea_qweight_cm *cm, size_t i) {
    return cm->scales_f16 ? ea_f16_to_f32(((const uint16_t *)cm->scales)[i]) : ((const float *)cm->scales)[i];
}
static inline float ea_cm_min(const ea_qweight_cm *cm, size_t i) {
    return cm->minimums_f16 ? ea_f16_to_f32(((const uint16_t *)cm->minimums)[i]) : ((const float *)cm->minimums)[i];
}

static inline int ea_is_simd(ea_isa isa) { return isa != EA_ISA_SCALAR; }

/* ---- the kernel table ------------------------------------------------------------------
 * One struct of function pointers per ISA variant, chosen once (ea_isa_select at model load,
 * ea_kctx_init binds it): the drivers (qmatmul.c, sparse.c, fmatmul.c, qmatmul_f32act.c,
 * transformer.c) split the work over threads and call these, never an ISA's function by
 * name. Every entry of every variant gives the bits of the scalar reference (ref/), except
 * the float kernels (matmul, attention, silu, dot), which hold a stated tolerance. */
typedef struct ea_kernel_table {
    ea_isa isa;
    int (*available)(void); /* this CPU runs it (CPUID, HWCAP) */
    /* MatMulNBits, accuracy_level 4: one row of activations to int8 per block; interleave:
     * each 32-element chunk as its 16 even then 16 odd elements (the int4 SIMD nibble order) */
    void (*quantize_row)(const float *x, int K, int bs, int8_t *xq, float *sx, int32_t *sumx, int interleave);
    /* output rows [n0, n1) (n0 a multiple of EA_QROWS) of y (row stride N) for all rows of a */
    void (*qmatmul)(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1);
    /* accuracy_level 0..3: row n of w dequantized from the file layout; a float dot product */
    void (*dequant_row)(const ea_qweight *w, int n, float *wf);
    float (*dot)(const float *a, const float *b, int K);
    /* ONNX MatMul, columns [n0, n1) of y */
    void (*matmul_f32)(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1);
    void (*matmul_f16)(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1);
    void (*f16_row)(const uint16_t *src, float *dst, size_t n);
    /* out[hd] = softmax(scale * K q) V over positions 0..L-1; sc: L floats of scratch */
    void (*attention_row)(const float *q, const float *kc, const float *vc, int hd, int L, float scale, float *sc,
                          float *out);
    void (*silu_mul)(const float *g, const float *u, size_t n, float *y); /* u NULL: SiLU alone */
    void (*gelu_tanh)(const float *x, size_t n, float *y);                /* Gelu(approximate="tanh") */
    /* activation sparsity: Sparsify's rule on one row; the active entries quantized (and, for
     * the x86 kernels, grouped in quads); tiles [t0, t1) of the input-sparse GEMV; listed
     * output rows of the dense product from the file layout */
    int (*sparsify)(const float *x, const float *thr, int thr_step, const float *col_scale, int n, float *y,
                    int32_t *active);
    void (*sparse_prep)(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes,
                        ea_sparse_act *a);
    void (*sparse_tiles)(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1);
    void (*qgemv_rows)(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y);
} ea_kernel_table;

/* The table of isa (NULL when this build has none). */
const ea_kernel_table *ea_kernel_table_of(ea_isa isa);

/* ---- ref/: the scalar references (the specification), also the SIMD kernels' tails ---- */
void ea_quantize_row_scalar(const float *x, int K, int bs, int8_t *xq, float *sx, int32_t *sumx, int interleave);
void ea_qmatmul_rows_scalar(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1);
void ea_dequant_row_scalar(const ea_qweight *w, int n, float *wf);
float ea_dot_scalar(const float *a, const float *b, int K);
/* columns [n0, n1) of x @ W, W16 (fp16) when W is NULL */
void ea_matmul_cols_scalar(const float *x, int M, int K, const float *W, const uint16_t *W16, int N, float *y, int n0,
                           int n1);
void ea_matmul_f32_scalar(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1);
void ea_matmul_f16_scalar(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1);
void ea_f16_row_scalar(const uint16_t *src, float *dst, size_t n);
void ea_attention_row_scalar(const float *q, const float *kc, const float *vc, int hd, int L, float scale, float *sc,
                             float *out);
void ea_silu_mul_scalar(const float *g, const float *u, size_t n, float *y);
/* Sparsify's rule over channels [k0, n): the kept k go to active[0..); returns their count
 * (the SIMD versions handle whole vectors and leave the tail to it) */
int ea_sparsify_scalar(const float *x, const float *thr, int thr_step, const float *col_scale, int k0, int n,
                       float *y, int32_t *active);
/* For packing the kept indices of 4 lanes to the front: for a 4-bit keep mask m, the kept
 * lanes as bytes from the lowest (ea_keep4_lanes[m]) and their count (ea_keep4_count[m]). */
extern const uint32_t ea_keep4_lanes[16];
extern const uint8_t ea_keep4_count[16];
/* The serial step of every sparse GEMV: the active entries of x quantized block by block
 * (a->n_blocks, blk, start, sx, sumx, ch, q: ea_quantize_row_scalar's arithmetic, entries
 * that round to 0 and blocks with none left dropped, a non-finite block kept with a nan
 * scale and no entries) and, with quads, grouped for the x86 kernels (qstart, qoff as
 * offsets of rows row_bytes long, qx). The AVX2 version (quads always) gives the same
 * arrays; ea_sparse_act's arrays hold n_active entries (q 3 bytes more). */
void ea_sparse_prep_scalar(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes, int quads,
                           ea_sparse_act *a);
void ea_sparse_tiles_scalar(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1);
void ea_rows_scalar(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y);

/* ---- x86/: AVX2 code serves three variants (avx2, avx2-vnni: vpdpbusd VEX, avx512-vnni:
 * the int4 GEMM/GEMV and sparse tile pairs on zmm, vpdpbusd EVEX on ymm elsewhere) ---- */
#if EA_X86
/* dot-product flavour of the AVX2 integer kernels (vecmath_avx2.h, dot_u8s8) */
enum { EA_DOT_MADD = 0, EA_DOT_VNNI_VEX = 1, EA_DOT_VNNI_EVEX = 2 };
void ea_quantize_row_avx2(const float *x, int K, int bs, int8_t *xq, float *sx, int32_t *sumx, int interleave);
void ea_qmatmul_avx2(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1);
void ea_qmatmul_avx2_vnni(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1);
void ea_qmatmul_avx512_vnni(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1);
void ea_dequant_row_avx2(const ea_qweight *w, int n, float *wf);
float ea_dot_avx2(const float *a, const float *b, int K);
void ea_matmul_f32_avx2(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1);
void ea_matmul_f16_avx2(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1);
void ea_f16_row_avx2(const uint16_t *src, float *dst, size_t n);
void ea_attention_row_avx2(const float *q, const float *kc, const float *vc, int hd, int L, float scale, float *sc,
                           float *out);
void ea_silu_mul_avx2(const float *g, const float *u, size_t n, float *y);
void ea_gelu_tanh_avx2(const float *x, size_t n, float *y);
void ea_gelu_tanh_avx512(const float *x, size_t n, float *y);
int ea_sparsify_avx2(const float *x, const float *thr, int thr_step, const float *col_scale, int n, float *y,
                     int32_t *active);
void ea_sparse_prep_avx2(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes,
                         ea_sparse_act *a);
void ea_sparse_tiles_avx2(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1);
void ea_sparse_tiles_avx2_vnni(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1);
void ea_sparse_tiles_avx2_evex(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1);
void ea_sparse_tiles_avx512_vnni(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1);
void ea_rows_avx2(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y);
/* the int4 groups [g0, g1) with AVX-512 VNNI (x86/qmatmul_avx512.c); the AVX2 code's int4 and
 * int8 groups with one dot flavour (x86/qmatmul_avx2.c) */
void ea_qmatmul_groups_avx512(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1);
void ea_qmatmul_groups_avx2(const ea_qweight *w, const ea_qact *a, float *y, int g0, int g1, int dot);
int ea_cpu_avx2(void);
extern const ea_kernel_table ea_kernels_avx2, ea_kernels_avx2_vnni, ea_kernels_avx512_vnni;
#endif

/* ---- arm/: NEON code serves neon and neon-dotprod (sdot) ---- */
#if EA_ARM64
void ea_qmatmul_neon(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1);
void ea_qmatmul_neon_dotprod(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1);
void ea_dequant_row_neon(const ea_qweight *w, int n, float *wf);
float ea_dot_neon(const float *a, const float *b, int K);
void ea_matmul_f32_neon(const float *x, int M, int K, const float *W, int N, float *y, int n0, int n1);
void ea_matmul_f16_neon(const float *x, int M, int K, const uint16_t *W, int N, float *y, int n0, int n1);
void ea_f16_row_neon(const uint16_t *src, float *dst, size_t n);
void ea_gelu_tanh_neon(const float *x, size_t n, float *y);
int ea_sparsify_neon(const float *x, const float *thr, int thr_step, const float *col_scale, int n, float *y,
                     int32_t *active);
void ea_sparse_tiles_neon(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1);
void ea_rows_neon(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y);
void ea_rows_neon_dotprod(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y);
extern const ea_kernel_table ea_kernels_neon, ea_kernels_neon_dotprod;
#endif

extern const ea_kernel_table ea_kernels_scalar;

#endif
