/* Activation-sparse MatMulNBits: the channel-major repack, quantization of
 * the active entries, scalar kernels and dispatch.
 *
 * Input sparsity (ea_sparse_qgemv): for each block holding active channels,
 * the channels' N-wide weight columns are combined in integers, then the
 * block is scaled into the N accumulators exactly as the dense kernel does
 * (fma(sx*sw, idot, acc), blocks in ascending order). A block without an
 * active channel contributes fma(0, 0, acc) = acc in the dense kernel, so
 * skipping it changes nothing and the results are bit-identical. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int ea_qweight_cm_init(ea_qweight_cm *cm, ea_isa isa, const ea_qweight *w) {
    return ea_qweight_cm_init_concat(cm, isa, &w, 1);
}

int ea_qweight_cm_init_concat(ea_qweight_cm *cm, ea_isa isa, const ea_qweight *const *ws, int n_w) {
    memset(cm, 0, sizeof *cm);
    if (!ws || n_w < 1) return EA_KERR_ARG;
    long total = 0;
    int f16 = 1;
    for (int i = 0; i < n_w; i++) {
        const ea_qweight *w = ws[i];
        if (!w || !w->data || w->bits != 4 || w->K != ws[0]->K || w->block_size != ws[0]->block_size ||
            !w->zero_points != !ws[0]->zero_points)
            return EA_KERR_ARG;
        total += w->N;
        /* w's repack found its scales exact in fp16 (the scalar isa has no repack: it checks here) */
        f16 &= w->packed ? w->packed_f16 : ea_scales_exact_in_f16(w->scales, (size_t)w->N * w->n_blocks);
    }
    if (total > (1L << 30)) return EA_KERR_ARG;
    if (!ea_isa_available(isa)) return EA_KERR_ISA_UNAVAILABLE;
    const int N = (int)total, np = (N + EA_CM_TILE - 1) / EA_CM_TILE * EA_CM_TILE, nb = ws[0]->n_blocks;
    const size_t kp = (size_t)nb * ws[0]->block_size;
    const size_t ssize = f16 ? sizeof(uint16_t) : sizeof(float);
    const size_t dbytes = kp * np / 2, sbytes = ssize * (size_t)nb * np;
    const size_t zbytes = ws[0]->zero_points ? (size_t)nb * np : 0;
    uint8_t *data = ea_alloc_weights(dbytes);
    uint8_t *scales = calloc((size_t)nb * np, ssize);
    uint8_t *zp = zbytes ? calloc(zbytes, 1) : NULL;
    int *src_w = malloc(sizeof(int) * (size_t)N), *src_r = malloc(sizeof(int) * (size_t)N);
    if (!data || !scales || (zbytes && !zp) || !src_w || !src_r) {
        free(data); free(scales); free(zp); free(src_w); free(src_r);
        return EA_KERR_NOMEM;
    }
    for (int i = 0, n = 0; i < n_w; i++) /* output row n of the concatenation: row src_r[n] of ws[src_w[n]] */
        for (int r = 0; r < ws[i]->N; r++, n++) {
            src_w[n] = i;
            src_r[n] = r;
        }
    const size_t row_bytes = kp / 2, stride = (size_t)np / 2;
    /* nibbles stay in natural n order (n even low, odd high): rows n and n+1 make the byte n/2
     * of every channel row, two channels per source byte. A byte-wise transpose in tiles of 128
     * rows x 64 channels, whose source and destination lines stay in L1 (the nibble-wise,
     * untiled one took most of a sparse folder's load time) */
    for (int n0 = 0; n0 < N; n0 += 128)
        for (size_t j0 = 0; j0 < row_bytes; j0 += 32) {
            const size_t j1 = j0 + 32 < row_bytes ? j0 + 32 : row_bytes;
            for (int n = n0; n < n0 + 128 && n < N; n += 2) {
                const uint8_t *s0 = ws[src_w[n]]->data + (size_t)src_r[n] * row_bytes;
                const uint8_t *s1 = n + 1 < N ? ws[src_w[n + 1]]->data + (size_t)src_r[n + 1] * row_bytes : NULL;
                uint8_t *dst = data + n / 2;
                for (size_t j = j0; j < j1; j++) {
                    const uint8_t lo = s0[j], hi = s1 ? s1[j] : 0; /* channels 2j (low nibbles), 2j+1 (high) */
                    dst[2 * j * stride] = (uint8_t)((lo & 15) | (hi << 4));
                    dst[(2 * j + 1) * stride] = (uint8_t)((lo >> 4) | (hi & 0xF0));
                }
            }
        }
    for (int t = 0; t < np / EA_CM_TILE; t++) {
        for (int lane = 0; lane < EA_CM_TILE; lane++) {
            /* the per-(block, n) scale and zero point follow the kernel's lane order */
            const int ln = t * EA_CM_TILE + ea_cm_lane_n(isa, lane);
            if (ln >= N) continue;
            const ea_qweight *w = ws[src_w[ln]];
            const int r = src_r[ln];
            for (int b = 0; b < nb; b++) {
                const size_t i = (size_t)b * np + t * EA_CM_TILE + lane;
                const float s = w->scales[(size_t)r * nb + b];
                if (f16) ((uint16_t *)scales)[i] = ea_f32_to_f16(s);
                else ((float *)scales)[i] = s;
                if (zp) zp[i] = (uint8_t)ea_qweight_zp(w, r, b);
            }
        }
    }
    free(src_w);
    free(src_r);
    cm->K = ws[0]->K;
    cm->N = N;
    cm->n_pad = np;
    cm->block_size = ws[0]->block_size;
    cm->n_blocks = nb;
    cm->isa = isa;
    cm->data = data;
    cm->scales = scales;
    cm->scales_f16 = f16;
    cm->zero_points = zp;
    cm->bytes = dbytes + sbytes + zbytes;
    return EA_KOK;
}

void ea_qweight_cm_release(ea_qweight_cm *cm) {
    free(cm->data);
    free(cm->scales);
    free(cm->zero_points);
    memset(cm, 0, sizeof *cm);
}

static int strictly_increasing(const int32_t *idx, int n, int limit) {
    for (int i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= limit || (i && idx[i] <= idx[i - 1])) return 0;
    return 1;
}

/* nearbyintf for |v| < 2^22 in the default rounding mode (ties to even). Baseline x86-64 has
 * no rounding instruction, so nearbyintf was a libm call per active channel, the largest part
 * of this serial pass; there, adding 1.5 * 2^23 leaves no fraction bits. Only there: with
 * FMA the compiler may fuse the caller's multiply into the add (skipping its rounding), and
 * x87 adds in extended precision; targets with a rounding instruction inline nearbyintf. */
#if defined(__x86_64__) && !defined(__SSE4_1__) && !defined(__FMA__) && FLT_EVAL_METHOD == 0
static inline float round_even_small(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}
#else
static inline float round_even_small(float v) { return nearbyintf(v); }
#endif

/* Quantizes the active entries block by block with the arithmetic of
 * ea_quantize_row_scalar; blocks whose active entries are all zero are
 * dropped (they contribute exactly nothing). */
static void quantize_active(const float *x, int bs, const int32_t *active, int n_active, ea_sparse_act *a) {
    a->n_blocks = 0;
    int i = 0, out = 0;
    while (i < n_active) {
        const int b = active[i] / bs;
        const int b_end = (b + 1) * bs; /* the list ascends: a compare, not a division per entry */
        int e = i;
        float amax = 0.0f;
        int finite = 1;
        for (; e < n_active && active[e] < b_end; e++) {
            const float v = fabsf(x[active[e]]);
            finite &= v <= FLT_MAX;
            amax = v > amax ? v : amax; /* fmaxf without the call; a nan is caught by finite */
        }
        float inv = finite && amax != 0.0f ? 127.0f / amax : 0.0f;
        if (inv > FLT_MAX) inv = 0.0f;
        if (!finite || inv != 0.0f) { /* non-finite: a nan scale with no entries poisons the outputs */
            const float scale = finite ? amax / 127.0f : NAN;
            int32_t sum = 0;
            const int start = out;
            for (int j = i; j < e && finite; j++) {
                const float r = round_even_small(x[active[j]] * inv); /* |x * inv| <= 127 + an ulp */
                const int v = r > 127.0f ? 127 : r < -128.0f ? -128 : (int)r;
                if (!v) continue; /* a zero contributes nothing to the integer dot */
                a->ch[out] = active[j];
                a->q[out++] = (int8_t)v;
                sum += v;
            }
            a->blk[a->n_blocks] = b;
            a->start[a->n_blocks] = start;
            a->sx[a->n_blocks] = scale;
            a->sumx[a->n_blocks++] = sum;
        }
        i = e;
    }
    a->start[a->n_blocks] = out;
}

/* Groups each block's entries in quads for the x86 kernels; a short last
 * quad repeats its first channel with value 0 (adds nothing). */
static void make_quads(const ea_sparse_act *a, size_t row_bytes, ea_sparse_act *out) {
    int nq = 0;
    for (int ab = 0; ab < a->n_blocks; ab++) {
        out->qstart[ab] = nq;
        for (int j = a->start[ab]; j < a->start[ab + 1]; j += 4, nq++) {
            uint32_t packed = 0;
            for (int c = 0; c < 4; c++) {
                const int e = j + c < a->start[ab + 1] ? j + c : j;
                out->qoff[4 * (size_t)nq + c] = (size_t)a->ch[e] * row_bytes;
                if (e == j + c) packed |= (uint32_t)(uint8_t)a->q[e] << (8 * c);
            }
            out->qx[nq] = (int32_t)packed;
        }
    }
    out->qstart[a->n_blocks] = nq;
}

void ea_sparse_prep_scalar(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes, int quads,
                           ea_sparse_act *a) {
    quantize_active(x, bs, active, n_active, a);
    if (quads) make_quads(a, row_bytes, a);
}

void ea_sparse_tiles_scalar(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    const int np = cm->n_pad;
    for (int t = t0; t < t1; t++) {
        float acc[EA_CM_TILE] = {0};
        for (int ab = 0; ab < a->n_blocks; ab++) {
            int32_t idot[EA_CM_TILE] = {0};
            for (int j = a->start[ab]; j < a->start[ab + 1]; j++) {
                const uint8_t *col = cm->data + (size_t)a->ch[j] * (np / 2) + t * EA_CM_TILE / 2;
                for (int n = 0; n < EA_CM_TILE; n++)
                    idot[n] += a->q[j] * ((n & 1) ? col[n / 2] >> 4 : col[n / 2] & 15);
            }
            const size_t sb = (size_t)a->blk[ab] * np + t * EA_CM_TILE;
            for (int lane = 0; lane < EA_CM_TILE; lane++) {
                const int n = ea_cm_lane_n(cm->isa, lane);
                const int zp = cm->zero_points ? cm->zero_points[sb + lane] : 8;
                const float s = a->sx[ab] * ea_cm_scale(cm, sb + lane);
                acc[lane] = fmaf(s, (float)(idot[n] - zp * a->sumx[ab]), acc[lane]);
            }
        }
        for (int lane = 0; lane < EA_CM_TILE; lane++) {
            const int n = t * EA_CM_TILE + ea_cm_lane_n(cm->isa, lane);
            if (n < cm->N) y[n] = acc[lane];
        }
    }
}

typedef struct {
    const ea_kctx *ctx;
    const ea_qweight_cm *cm;
    const ea_sparse_act *a;
    float *y;
    int tiles, n_tasks;
    float *const *outs; /* ea_sparse_qgemv_split: the members' outputs, ns[i] rows each */
    const int *ns;
    int n_outs;
} sjob;

/* Rows [r0, r1) of y to the member outputs that hold them. */
static void deliver_rows(const sjob *j, int r0, int r1) {
    for (int i = 0, off = 0; i < j->n_outs && off < r1; off += j->ns[i], i++) {
        const int lo = r0 > off ? r0 : off, hi = r1 < off + j->ns[i] ? r1 : off + j->ns[i];
        if (lo < hi) memcpy(j->outs[i] + (lo - off), j->y + lo, sizeof(float) * (size_t)(hi - lo));
    }
}

static void sparse_task(void *arg, int task, int thread) {
    (void)thread;
    const sjob *j = arg;
    /* even tile boundaries: the AVX-512 kernel works on tile pairs */
    const int pairs = (j->tiles + 1) / 2;
    const int t0 = 2 * (int)((long)pairs * task / j->n_tasks);
    int t1 = 2 * (int)((long)pairs * (task + 1) / j->n_tasks);
    if (t1 > j->tiles) t1 = j->tiles;
    if (t0 >= t1) return;
    switch (j->ctx->isa) {
#if EA_X86
    case EA_ISA_AVX2: ea_sparse_tiles_avx2(j->cm, j->a, j->y, t0, t1); break;
#endif
#if EA_ARM64
    case EA_ISA_NEON:
    case EA_ISA_NEON_DOTPROD: ea_sparse_tiles_neon(j->cm, j->a, j->y, t0, t1); break;
#endif
    default: ea_sparse_tiles_scalar(j->cm, j->a, j->y, t0, t1);
    }
    /* while the rows are still in this core's cache: copied later by the caller's thread,
     * the other core's half crossed between cores (up_proj's copy was 2% of a sparse token) */
    if (j->n_outs) deliver_rows(j, t0 * EA_CM_TILE, t1 * EA_CM_TILE < j->cm->N ? t1 * EA_CM_TILE : j->cm->N);
}

static int same_family(ea_isa a, ea_isa b) {
    if (a == EA_ISA_NEON_DOTPROD) a = EA_ISA_NEON;
    if (b == EA_ISA_NEON_DOTPROD) b = EA_ISA_NEON;
    return a == b;
}

const uint32_t ea_keep4_lanes[16] = {0x0, 0x0, 0x1, 0x100, 0x2, 0x200, 0x201, 0x20100,
                                     0x3, 0x300, 0x301, 0x30100, 0x302, 0x30200, 0x30201, 0x3020100};
const uint8_t ea_keep4_count[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

int ea_sparsify_scalar(const float *x, const float *thr, int thr_step, const float *col_scale, int k0, int n,
                       float *y, int32_t *active) {
    int na = 0;
    for (int k = k0; k < n; k++) {
        /* branch-free: a data-dependent branch mispredicts half the time at 50% */
        const int keep = fabsf(x[k]) * (col_scale ? col_scale[k] : 1.0f) >= thr[(size_t)k * thr_step];
        y[k] = keep ? x[k] : 0.0f;
        active[na] = k;
        na += keep;
    }
    return na;
}

int ea_sparsify(const ea_kctx *ctx, const float *x, const float *thr, int thr_step, const float *col_scale, int n,
                float *y, int32_t *active) {
    thr_step = thr_step != 0;
    switch (ctx->isa) {
#if EA_X86
    case EA_ISA_AVX2: return ea_sparsify_avx2(x, thr, thr_step, col_scale, n, y, active);
#endif
#if EA_ARM64
    case EA_ISA_NEON:
    case EA_ISA_NEON_DOTPROD: return ea_sparsify_neon(x, thr, thr_step, col_scale, n, y, active);
#endif
    default: return ea_sparsify_scalar(x, thr, thr_step, col_scale, 0, n, y, active);
    }
}

int ea_sparse_prefers_dense(const ea_qweight_cm *cm, int n_active) {
    const float crossover = cm->N < EA_SPARSE_LONG_N ? EA_SPARSE_SHORT_CROSSOVER : EA_SPARSE_DENSE_CROSSOVER;
    return n_active > crossover * cm->K || cm->N < EA_SPARSE_MIN_N;
}

int ea_masked_qgemv(ea_kctx *ctx, const ea_qweight *w, const float *x, const int32_t *active, int n_active, float *y) {
    if (!w || n_active < 0 || !strictly_increasing(active, n_active, w->K)) return EA_KERR_ARG;
    /* the buffer stays zero between calls: only the active entries are written and cleared
     * (a calloc and a K-wide clear per call on the measured choice's dense path before) */
    if (ctx->masked_cap < (size_t)w->K) {
        float *p = calloc((size_t)w->K, sizeof(float));
        if (!p) return EA_KERR_NOMEM;
        free(ctx->masked);
        ctx->masked = p;
        ctx->masked_cap = (size_t)w->K;
    }
    float *xm = ctx->masked;
    for (int i = 0; i < n_active; i++) xm[active[i]] = x[active[i]];
    const int rc = ea_qmatmul(ctx, w, xm, 1, y);
    for (int i = 0; i < n_active; i++) xm[active[i]] = 0.0f;
    return rc;
}

static int sparse_qgemv(ea_kctx *ctx, const ea_qweight_cm *cm, const ea_qweight *dense, const float *x,
                        const int32_t *active, int n_active, float *y, float *const *outs, const int *ns, int n_outs) {
    if (!cm || !cm->data || n_active < 0 || !strictly_increasing(active, n_active, cm->K)) return EA_KERR_ARG;
    /* the scalar kernel reads any lane order; SIMD kernels need their own */
    const ea_isa isa = ctx->isa;
    if (isa != EA_ISA_SCALAR && !same_family(cm->isa, isa)) return EA_KERR_LAYOUT;
    if (dense && ea_sparse_prefers_dense(cm, n_active)) return ea_masked_qgemv(ctx, dense, x, active, n_active, y);
    const int nb = cm->n_blocks;
    const size_t acc_bytes = 2 * sizeof(float) * (size_t)cm->n_pad; /* acc, dacc */
    const size_t max_quads = (size_t)n_active / 4 + nb + 1;
    const size_t quad_bytes = max_quads * (4 * sizeof(size_t) + sizeof(int32_t)) + (size_t)(nb + 1) * sizeof(int32_t);
    const size_t need = acc_bytes + quad_bytes + (size_t)n_active * (sizeof(int32_t) + 1) +
                        (size_t)(nb + 1) * 4 * sizeof(int32_t) + 64;
    uint8_t *s = ea_scratch(ctx, need);
    if (!s) return EA_KERR_NOMEM;
    ea_sparse_act a;
    a.acc = (float *)s;
    a.dacc = (int32_t *)(s + acc_bytes / 2);
    a.qoff = (size_t *)(s + acc_bytes); /* acc_bytes is a multiple of 128 */
    a.qx = (int32_t *)(a.qoff + 4 * max_quads);
    a.qstart = a.qx + max_quads;
    a.ch = a.qstart + nb + 1;
    a.blk = a.ch + n_active;
    a.start = a.blk + nb + 1;
    a.sumx = a.start + nb + 1;
    a.sx = (float *)(a.sumx + nb + 1);
    a.q = (int8_t *)(a.sx + nb + 1);
#if EA_X86
    if (isa == EA_ISA_AVX2) ea_sparse_prep_avx2(x, cm->block_size, active, n_active, (size_t)cm->n_pad / 2, &a);
    else
#endif
        ea_sparse_prep_scalar(x, cm->block_size, active, n_active, (size_t)cm->n_pad / 2, 0, &a);
    const int tiles = cm->n_pad / EA_CM_TILE;
    int n_tasks = ea_pool_size(ctx->pool);
    if (n_tasks > (tiles + 1) / 2) n_tasks = (tiles + 1) / 2;
    sjob j = {ctx, cm, &a, y, tiles, n_tasks, outs, ns, n_outs};
    ea_pool_run(ctx->pool, sparse_task, &j, n_tasks);
    return EA_KOK;
}

int ea_sparse_qgemv(ea_kctx *ctx, const ea_qweight_cm *cm, const ea_qweight *dense, const float *x,
                    const int32_t *active, int n_active, float *y) {
    return sparse_qgemv(ctx, cm, dense, x, active, n_active, y, NULL, NULL, 0);
}

int ea_sparse_qgemv_split(ea_kctx *ctx, const ea_qweight_cm *cm, const float *x, const int32_t *active,
                          int n_active, float *scratch, float *const *outs, const int *ns, int n_outs) {
    if (!cm || !outs || !ns || n_outs < 1) return EA_KERR_ARG;
    long total = 0;
    for (int i = 0; i < n_outs; i++) {
        if (!outs[i] || ns[i] < 0) return EA_KERR_ARG;
        total += ns[i];
    }
    if (total != cm->N) return EA_KERR_ARG;
    return sparse_qgemv(ctx, cm, NULL, x, active, n_active, scratch, outs, ns, n_outs);
}

/* ---- output-row subset (gated FFN) ---------------------------------------- */
typedef struct {
    const ea_kctx *ctx;
    const ea_qweight *w;
    const ea_qact *a;
    const int32_t *rows;
    float *y;
    int n_rows, n_tasks;
} rjob;

void ea_rows_scalar(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y) {
    for (int i = 0; i < n_rows; i++) ea_qmatmul_rows_scalar(w, a, y, rows[i], rows[i] + 1);
}

static void rows_task(void *arg, int task, int thread) {
    (void)thread;
    const rjob *j = arg;
    /* whole quads of rows per task so the SIMD kernel's 4-row steps stay intact */
    const int quads = (j->n_rows + 3) / 4;
    const int q0 = (int)((long)quads * task / j->n_tasks), q1 = (int)((long)quads * (task + 1) / j->n_tasks);
    const int r0 = q0 * 4, r1 = q1 * 4 < j->n_rows ? q1 * 4 : j->n_rows;
    if (r0 >= r1) return;
#if EA_X86
    if (j->ctx->isa == EA_ISA_AVX2) { ea_rows_avx2(j->w, j->a, j->rows + r0, r1 - r0, j->y); return; }
#endif
#if EA_ARM64
    if (j->ctx->isa != EA_ISA_SCALAR) {
        ea_rows_neon(j->w, j->a, j->rows + r0, r1 - r0, j->y, j->ctx->isa == EA_ISA_NEON_DOTPROD);
        return;
    }
#endif
    ea_rows_scalar(j->w, j->a, j->rows + r0, r1 - r0, j->y);
}

int ea_qgemv_rows(ea_kctx *ctx, const ea_qweight *w, const float *x, const int32_t *rows, int n_rows, float *y) {
    if (!w || !w->data || n_rows < 0 || !strictly_increasing(rows, n_rows, w->N)) return EA_KERR_ARG;
    if (n_rows == 0) return EA_KOK;
    const int nb = w->n_blocks, kp = nb * w->block_size;
    const size_t xq_bytes = ((size_t)kp + 63) & ~(size_t)63;
    uint8_t *s = ea_scratch(ctx, xq_bytes + (size_t)nb * (sizeof(float) + sizeof(int32_t)));
    if (!s) return EA_KERR_NOMEM;
    ea_qact a = {1, w->K, w->block_size, nb, (int8_t *)s, (float *)(s + xq_bytes),
                 (int32_t *)(s + xq_bytes + (size_t)nb * sizeof(float))};
    const int interleave = ctx->isa != EA_ISA_SCALAR && w->bits == 4;
#if EA_X86
    if (ctx->isa == EA_ISA_AVX2) ea_quantize_row_avx2(x, w->K, w->block_size, a.xq, a.sx, a.sumx, interleave);
    else
#endif
        ea_quantize_row_scalar(x, w->K, w->block_size, a.xq, a.sx, a.sumx, interleave);
    int n_tasks = ea_pool_size(ctx->pool);
    const int quads = (n_rows + 3) / 4;
    if (n_tasks > quads) n_tasks = quads;
    rjob j = {ctx, w, &a, rows, y, n_rows, n_tasks};
    ea_pool_run(ctx->pool, rows_task, &j, n_tasks);
    return EA_KOK;
}
