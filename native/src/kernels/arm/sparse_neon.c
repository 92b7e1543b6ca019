/* NEON activation-sparse kernels (semantics: sparse.c).
 *
 * Input-sparse GEMV: each active channel's 32 nibbles of a tile are split
 * into even and odd rows and multiply-accumulated with its broadcast value
 * by smlal into int16 (widened every 16 channels: 16*15*128 < 32767). The
 * same code serves neon and neon-dotprod: sdot sums four products of one
 * row, while here each product lands in a different row. */
#include "../internal.h"

#if EA_ARM64
#include <arm_neon.h>

static inline void widen(int32x4_t i32[8], int16x8_t acc16[4]) {
    for (int v = 0; v < 4; v++) {
        i32[2 * v] = vaddw_s16(i32[2 * v], vget_low_s16(acc16[v]));
        i32[2 * v + 1] = vaddw_high_s16(i32[2 * v + 1], acc16[v]);
        acc16[v] = vdupq_n_s16(0);
    }
}

/* Blocks outer, tiles inner (as in sparse_avx2.c): the active channels'
 * rows stream front to back while the accumulators stay in cache. */
void ea_sparse_tiles_neon(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    const size_t cstride = (size_t)cm->n_pad / 2;
    float *accbuf = a->acc;
    /* a 64-row tile is two 32-row halves (16 bytes of nibbles each) */
    const int h0 = 2 * t0, h1 = 2 * t1, HALF = EA_CM_TILE / 2;
    for (int t = h0; t < h1; t++)
        for (int v = 0; v < 8; v++) vst1q_f32(accbuf + t * HALF + 4 * v, vdupq_n_f32(0.0f));
    const uint8_t *mins = cm->minimums;
    const size_t msize = ea_qpack_scale_size(cm->minimums_f16);
    const int32x4_t zp_sym = vdupq_n_s32(mins ? 0 : 8); /* float minimums: codes with zero point 0 */
    for (int ab = 0; ab < a->n_blocks; ab++) {
        const int start = a->start[ab], end = a->start[ab + 1];
        const int32x4_t sumx = vdupq_n_s32(a->sumx[ab]);
        const float32x4_t sx = vdupq_n_f32(a->sx[ab]);
        const float32x4_t sxsum = vdupq_n_f32(a->sx[ab] * (float)a->sumx[ab]); /* the minimums' factor */
        for (int t = h0; t < h1; t++) {
            const uint8_t *base = cm->data + (size_t)t * HALF / 2;
            int32x4_t i32[8];
            int16x8_t acc16[4]; /* even 0..14, even 16..30, odd 1..15, odd 17..31 */
            for (int v = 0; v < 8; v++) i32[v] = vdupq_n_s32(0);
            for (int v = 0; v < 4; v++) acc16[v] = vdupq_n_s16(0);
            int count = 0;
            for (int j = start; j < end; j++) {
                const uint8x16_t w = vld1q_u8(base + (size_t)a->ch[j] * cstride);
                const int8x16_t ev = vreinterpretq_s8_u8(vandq_u8(w, vdupq_n_u8(15)));
                const int8x16_t od = vreinterpretq_s8_u8(vshrq_n_u8(w, 4));
                const int8x16_t q = vdupq_n_s8(a->q[j]);
                acc16[0] = vmlal_s8(acc16[0], vget_low_s8(ev), vget_low_s8(q));
                acc16[1] = vmlal_high_s8(acc16[1], ev, q);
                acc16[2] = vmlal_s8(acc16[2], vget_low_s8(od), vget_low_s8(q));
                acc16[3] = vmlal_high_s8(acc16[3], od, q);
                if (++count == 16) {
                    widen(i32, acc16);
                    count = 0;
                }
            }
            widen(i32, acc16);
            const size_t sb = (size_t)a->blk[ab] * cm->n_pad + (size_t)t * HALF;
            for (int v = 0; v < 8; v++) {
                int32x4_t zp;
                if (cm->zero_points) {
                    const uint8_t *z = cm->zero_points + sb + 4 * v;
                    const int32_t zz[4] = {z[0], z[1], z[2], z[3]};
                    zp = vld1q_s32(zz);
                } else {
                    zp = zp_sym;
                }
                const int32x4_t idot = vmlsq_s32(i32[v], zp, sumx);
                const float32x4_t s = vmulq_f32(
                    sx, ea_load4_scales((const uint8_t *)cm->scales + (sb + 4 * v) * ea_qpack_scale_size(cm->scales_f16),
                                        cm->scales_f16));
                float *acc = accbuf + t * HALF + 4 * v;
                float32x4_t r = vfmaq_f32(vld1q_f32(acc), s, vcvtq_f32_s32(idot));
                if (mins) r = vfmaq_f32(r, ea_load4_scales(mins + (sb + 4 * v) * msize, cm->minimums_f16), sxsum);
                vst1q_f32(acc, r);
            }
        }
    }
    for (int t = t0; t < t1; t++)
        for (int lane = 0; lane < EA_CM_TILE; lane++) {
            const int n = t * EA_CM_TILE + ea_cm_lane_n(EA_ISA_NEON, lane);
            if (n < cm->N) y[n] = accbuf[t * EA_CM_TILE + lane];
        }
}

/* ---- output-row subset: four listed rows at a time from the file layout ---- */
static inline int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t x) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
    return vpadalq_s16(acc, vmull_high_s8(w, x));
}

EA_TARGET_DOTPROD static inline int32x4_t dot16_dp(int32x4_t acc, int8x16_t w, int8x16_t x) {
    return vdotq_s32(acc, w, x);
}

static inline __attribute__((always_inline)) void
rows_impl(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y, int DP) {
    const int bs = w->block_size, nb = w->n_blocks, bpb = bs * w->bits / 8;
    for (int i = 0; i < n_rows; i += 4) {
        int n[4];
        const uint8_t *rp[4];
        for (int r = 0; r < 4; r++) {
            n[r] = rows[i + r < n_rows ? i + r : i]; /* a short last quad repeats a row */
            rp[r] = w->data + (size_t)n[r] * nb * bpb;
        }
        const uint8_t *np[4]; /* the next quad's rows, a block ahead of use (as in sparse_avx2.c) */
        for (int r = 0; r < 4; r++) np[r] = w->data + (size_t)ea_next_quad_row(rows, n_rows, i, r) * nb * bpb;
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; b++) {
            for (int r = 0; r < 4; r++)
                for (int o = 0; o < bpb; o += 64) __builtin_prefetch(np[r] + (size_t)b * bpb + o);
            int32x4_t d[4];
            for (int r = 0; r < 4; r++) d[r] = vdupq_n_s32(0);
            for (int c = 0; c < bs / 32; c++) {
                const int8x16_t xa = vld1q_s8(a->xq + b * bs + c * 32);
                const int8x16_t xb = vld1q_s8(a->xq + b * bs + c * 32 + 16);
                for (int r = 0; r < 4; r++) {
                    int8x16_t wa, wb;
                    if (w->bits == 4) { /* x interleaved [even16 | odd16] */
                        const uint8x16_t v = vld1q_u8(rp[r] + (size_t)b * bpb + c * 16);
                        wa = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
                        wb = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                    } else {
                        const uint8_t *p = rp[r] + (size_t)b * bpb + c * 32;
                        wa = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), vdupq_n_u8(0x80)));
                        wb = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + 16), vdupq_n_u8(0x80)));
                    }
                    d[r] = DP ? dot16_dp(dot16_dp(d[r], wa, xa), wb, xb) : dot16(dot16(d[r], wa, xa), wb, xb);
                }
            }
            const int off = w->bits == 8 ? 128 : 0;
            const int32_t cz[4] = {off - ea_qweight_zp(w, n[0], b), off - ea_qweight_zp(w, n[1], b),
                                   off - ea_qweight_zp(w, n[2], b), off - ea_qweight_zp(w, n[3], b)};
            const float sws[4] = {w->scales[(size_t)n[0] * nb + b], w->scales[(size_t)n[1] * nb + b],
                                  w->scales[(size_t)n[2] * nb + b], w->scales[(size_t)n[3] * nb + b]};
            int32x4_t idot = vpaddq_s32(vpaddq_s32(d[0], d[1]), vpaddq_s32(d[2], d[3]));
            idot = vmlaq_s32(idot, vld1q_s32(cz), vdupq_n_s32(a->sumx[b]));
            acc = vfmaq_f32(acc, vmulq_f32(vdupq_n_f32(a->sx[b]), vld1q_f32(sws)), vcvtq_f32_s32(idot));
            if (w->has_minimums) { /* codes with zero point 0 above (ea_qweight_zp), then the minimum term */
                const float mn[4] = {w->minimums[(size_t)n[0] * nb + b], w->minimums[(size_t)n[1] * nb + b],
                                     w->minimums[(size_t)n[2] * nb + b], w->minimums[(size_t)n[3] * nb + b]};
                acc = vfmaq_f32(acc, vld1q_f32(mn), vdupq_n_f32(a->sx[b] * (float)a->sumx[b]));
            }
        }
        float tmp[4];
        vst1q_f32(tmp, acc);
        for (int r = 0; r < 4 && i + r < n_rows; r++) y[n[r]] = tmp[r];
    }
}

EA_TARGET_DOTPROD static void rows_dotprod(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows,
                                           float *y) {
    rows_impl(w, a, rows, n_rows, y, 1);
}

void ea_rows_neon(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y) {
    rows_impl(w, a, rows, n_rows, y, 0);
}

void ea_rows_neon_dotprod(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y) {
    rows_dotprod(w, a, rows, n_rows, y);
}

/* ea_sparsify, 4 channels a step: the kept ones' indices are packed to the
 * front by a table lookup on the 4-bit keep mask and stored whole (na never
 * passes k, so the stored lanes stay inside active[0, n)). uthr / ones as in
 * sparse_avx2.c: constant per call, so each variant loads only what it needs. */
static inline __attribute__((always_inline)) int sparsify_body(const float *x, const float *thr, const float *col_scale,
                                                              int n, float *y, int32_t *active, int uthr, int ones) {
    static const uint32_t bit_of_lane[4] = {1, 2, 4, 8}, lane_idx[4] = {0, 1, 2, 3};
    const uint32x4_t bits = vld1q_u32(bit_of_lane), lanes = vld1q_u32(lane_idx);
    const uint32x4_t byte_step = vdupq_n_u32(0x04040404u), byte_in_lane = vdupq_n_u32(0x03020100u);
    const float32x4_t t1 = vdupq_n_f32(uthr && n > 0 ? thr[0] : 0.0f);
    int na = 0, k = 0;
    for (; k + 4 <= n; k += 4) {
        const float32x4_t v = vld1q_f32(x + k);
        float32x4_t score = vabsq_f32(v);
        if (!ones) score = vmulq_f32(score, vld1q_f32(col_scale + k));
        const uint32x4_t keep = vcgeq_f32(score, uthr ? t1 : vld1q_f32(thr + k));
        vst1q_f32(y + k, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), keep)));
        const uint32_t m = vaddvq_u32(vandq_u32(keep, bits));
        /* source lane j of output lane i -> bytes 4j..4j+3 */
        const uint32x4_t src = vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(ea_keep4_lanes[m]))));
        const uint8x16_t shuf = vreinterpretq_u8_u32(vmlaq_u32(byte_in_lane, src, byte_step));
        const uint32x4_t idx = vaddq_u32(vdupq_n_u32((uint32_t)k), lanes);
        vst1q_s32(active + na, vreinterpretq_s32_u8(vqtbl1q_u8(vreinterpretq_u8_u32(idx), shuf)));
        na += ea_keep4_count[m];
    }
    return na + ea_sparsify_scalar(x, thr, !uthr, col_scale, k, n, y, active + na);
}

int ea_sparsify_neon(const float *x, const float *thr, int thr_step, const float *col_scale, int n, float *y,
                     int32_t *active) {
    if (!col_scale) return thr_step ? sparsify_body(x, thr, NULL, n, y, active, 0, 1) : sparsify_body(x, thr, NULL, n, y, active, 1, 1);
    return thr_step ? sparsify_body(x, thr, col_scale, n, y, active, 0, 0) : sparsify_body(x, thr, col_scale, n, y, active, 1, 0);
}
#endif
