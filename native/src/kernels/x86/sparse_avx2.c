/* AVX2 activation-sparse kernels (semantics: sparse.c).
 *
 * Input-sparse GEMV: the active channels of a block come in quads (sparse.c
 * pads the last one with a zero value). The 32-byte tile pieces (64 rows)
 * of a quad's four channels are byte-interleaved in place (two byte and two
 * word unpacks per pair of vectors, no lane crossing: the row order this
 * leaves is ea_cm_lane_n's) so each int32 lane holds one row's four weights,
 * and one vpdpbusd (or maddubs + madd without AVX-VNNI: the same integers)
 * adds the four products per row in int32. Odd rows take their high nibble
 * in place with AVX-VNNI (16x its value, shifted back once per block), and the
 * accumulators start at the zero-point term, so the inner loop is loads,
 * unpacks, ands and dots (float minimums: zero point 0, and their term after
 * the block's scale step). Blocks are the outer loop: the active channels'
 * rows of one block stream front to back across the thread's tiles (tiles
 * outer, touching every active row per tile, thrashes the TLB) while the
 * float accumulators stay in L1/L2, and the rows are prefetched a fixed
 * number of tiles ahead (ea_sparse_pf_at), one line per two tiles; 64-row
 * tiles halve the unpacks per weight of 32-row ones (docs/performance.md,
 * "sparse tile layout"). */
#include <float.h>
#include <math.h>
#include <string.h>

#include "../internal.h"

#if EA_X86
#include <immintrin.h>

#include "vecmath_avx2.h"

AVX2 static inline __m256i nibbles_even_odd(const uint8_t *p) {
    const __m128i w = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(w, 4), w), _mm256_set1_epi8(0x0F));
}

/* High nibbles: in place (16x) for vpdpbusd, whose int32 sums cannot
 * overflow; shifted down for maddubs, whose int16 pair sums would saturate. */
AVX2 static inline __attribute__((always_inline)) __m256i hi_nibbles(__m256i v, __m256i m4, int VNNI) {
    return VNNI ? _mm256_andnot_si256(m4, v) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
}

AVX2 static inline __attribute__((always_inline)) void sparse_tiles(const ea_qweight_cm *cm, const ea_sparse_act *a,
                                                                   float *y, int t0, int t1, int VNNI) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int HI_SHIFT = VNNI ? 4 : 0;
    const int f16 = cm->scales_f16, mf16 = cm->minimums_f16;
    const size_t ssize = f16 ? 2 : 4, msize = mf16 ? 2 : 4;
    const uint8_t *mins = cm->minimums;
    float *accbuf = a->acc;
    for (int t = t0; t < t1; t++)
        for (int v = 0; v < 8; v++) _mm256_storeu_ps(accbuf + t * EA_CM_TILE + 8 * v, _mm256_setzero_ps());
    int32_t *dbuf = a->dacc;
    for (int ab = 0; ab < a->n_blocks; ab++) {
        const int q0 = a->qstart[ab], q1 = a->qstart[ab + 1];
        const int qn = ab + 1 < a->n_blocks ? a->qstart[ab + 2] : q1;
        const __m256i sumx = _mm256_set1_epi32(a->sumx[ab]);
        /* -8 sumx; with float minimums the codes' zero point is 0 */
        const __m256i nz = mins ? _mm256_setzero_si256() : _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sumx, 3));
        const __m256i nz16 = _mm256_slli_epi32(nz, HI_SHIFT);
        const __m256 sx = _mm256_set1_ps(a->sx[ab]);
        const __m256 sxsum = _mm256_set1_ps(a->sx[ab] * (float)a->sumx[ab]); /* the minimums' factor */
        for (int c0 = q0;; c0 += EA_SPARSE_CHUNK_QUADS) {
            const ea_sparse_chunk ch = ea_sparse_chunk_at(q0, q1, qn, c0);
            const int c1 = ch.c1, first = ch.first, last = ch.last;
            for (int t = t0; t < t1; t++) {
                const uint8_t *base = cm->data + (size_t)t * (EA_CM_TILE / 2);
                if ((t & 1) == 0 || t == t0) { /* once per cache line (two tiles) */
                    const ea_sparse_pf pf = ea_sparse_pf_at(ch, c0, t, t0, t1);
                    const uint8_t *pbase = cm->data + (size_t)pf.t * (EA_CM_TILE / 2);
                    for (int q = pf.q0; q < pf.q1; q++)
                        for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(pbase + a->qoff[4 * (size_t)q + c]), _MM_HINT_T0);
                }
                if (last && ab + 1 < a->n_blocks) { /* and the next block's scales and zero points: a few KB per block, too short for the hardware */
                    const size_t nsb = (size_t)a->blk[ab + 1] * cm->n_pad + (size_t)t * EA_CM_TILE;
                    const char *ns = (const char *)cm->scales + nsb * ssize;
                    for (size_t off = 0; off < EA_CM_TILE * ssize; off += 64) _mm_prefetch(ns + off, _MM_HINT_T0);
                    if (cm->zero_points) _mm_prefetch((const char *)(cm->zero_points + nsb), _MM_HINT_T0);
                    for (size_t off = 0; mins && off < EA_CM_TILE * msize; off += 64)
                        _mm_prefetch((const char *)(mins + nsb * msize + off), _MM_HINT_T0);
                }
                /* accumulators start at -zp*sumx (the zero-point term, exact in
                 * integers); odd rows take the high nibble in place (16x its value,
                 * shifted back before the float step) */
                const size_t sb = (size_t)a->blk[ab] * cm->n_pad + (size_t)t * EA_CM_TILE;
                int32_t *dt = dbuf + (size_t)t * EA_CM_TILE;
                __m256i d0 = nz, d1 = nz16, d2 = nz, d3 = nz16, d4 = nz, d5 = nz16, d6 = nz, d7 = nz16;
                if (!first) {
                    d0 = _mm256_load_si256((const __m256i *)dt); d1 = _mm256_load_si256((const __m256i *)dt + 1);
                    d2 = _mm256_load_si256((const __m256i *)dt + 2); d3 = _mm256_load_si256((const __m256i *)dt + 3);
                    d4 = _mm256_load_si256((const __m256i *)dt + 4); d5 = _mm256_load_si256((const __m256i *)dt + 5);
                    d6 = _mm256_load_si256((const __m256i *)dt + 6); d7 = _mm256_load_si256((const __m256i *)dt + 7);
                } else if (cm->zero_points) {
                    __m256i z[8];
                    for (int v = 0; v < 8; v++) {
                        const __m256i zs = _mm256_mullo_epi32(
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cm->zero_points + sb + 8 * v))), sumx);
                        z[v] = _mm256_sub_epi32(_mm256_setzero_si256(), (v & 1) ? _mm256_slli_epi32(zs, HI_SHIFT) : zs);
                    }
                    d0 = z[0]; d1 = z[1]; d2 = z[2]; d3 = z[3]; d4 = z[4]; d5 = z[5]; d6 = z[6]; d7 = z[7];
                }
                for (int q = c0; q < c1; q++) {
                    const size_t *o = a->qoff + 4 * (size_t)q;
                    const __m256i p0 = _mm256_load_si256((const __m256i *)(base + o[0]));
                    const __m256i p1 = _mm256_load_si256((const __m256i *)(base + o[1]));
                    const __m256i p2 = _mm256_load_si256((const __m256i *)(base + o[2]));
                    const __m256i p3 = _mm256_load_si256((const __m256i *)(base + o[3]));
                    const __m256i u0 = _mm256_unpacklo_epi8(p0, p1), u1 = _mm256_unpackhi_epi8(p0, p1);
                    const __m256i u2 = _mm256_unpacklo_epi8(p2, p3), u3 = _mm256_unpackhi_epi8(p2, p3);
                    const __m256i x = _mm256_set1_epi32(a->qx[q]);
                    __m256i v = _mm256_unpacklo_epi16(u0, u2);
                    d0 = dot_u8s8(d0, _mm256_and_si256(v, m4), x, VNNI);
                    d1 = dot_u8s8(d1, hi_nibbles(v, m4, VNNI), x, VNNI);
                    v = _mm256_unpackhi_epi16(u0, u2);
                    d2 = dot_u8s8(d2, _mm256_and_si256(v, m4), x, VNNI);
                    d3 = dot_u8s8(d3, hi_nibbles(v, m4, VNNI), x, VNNI);
                    v = _mm256_unpacklo_epi16(u1, u3);
                    d4 = dot_u8s8(d4, _mm256_and_si256(v, m4), x, VNNI);
                    d5 = dot_u8s8(d5, hi_nibbles(v, m4, VNNI), x, VNNI);
                    v = _mm256_unpackhi_epi16(u1, u3);
                    d6 = dot_u8s8(d6, _mm256_and_si256(v, m4), x, VNNI);
                    d7 = dot_u8s8(d7, hi_nibbles(v, m4, VNNI), x, VNNI);
                }
                if (!last) {
                    _mm256_store_si256((__m256i *)dt, d0); _mm256_store_si256((__m256i *)dt + 1, d1);
                    _mm256_store_si256((__m256i *)dt + 2, d2); _mm256_store_si256((__m256i *)dt + 3, d3);
                    _mm256_store_si256((__m256i *)dt + 4, d4); _mm256_store_si256((__m256i *)dt + 5, d5);
                    _mm256_store_si256((__m256i *)dt + 6, d6); _mm256_store_si256((__m256i *)dt + 7, d7);
                    continue;
                }
                const __m256i d[8] = {d0, _mm256_srai_epi32(d1, HI_SHIFT), d2, _mm256_srai_epi32(d3, HI_SHIFT),
                                      d4, _mm256_srai_epi32(d5, HI_SHIFT), d6, _mm256_srai_epi32(d7, HI_SHIFT)};
                for (int v = 0; v < 8; v++) {
                    const __m256 s = _mm256_mul_ps(sx, ea_load8_scales((const uint8_t *)cm->scales + (sb + 8 * v) * ssize, f16));
                    float *acc = accbuf + t * EA_CM_TILE + 8 * v;
                    __m256 r = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d[v]), _mm256_loadu_ps(acc));
                    if (mins) r = _mm256_fmadd_ps(ea_load8_scales(mins + (sb + 8 * v) * msize, mf16), sxsum, r);
                    _mm256_storeu_ps(acc, r);
                }
            }
            if (last) break;
        }
    }
    for (int t = t0; t < t1; t++)
        for (int lane = 0; lane < EA_CM_TILE; lane++) {
            const int n = t * EA_CM_TILE + ea_cm_lane_n(EA_ISA_AVX2, lane);
            if (n < cm->N) y[n] = accbuf[t * EA_CM_TILE + lane];
        }
}

AVX2 void ea_sparse_tiles_avx2(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    sparse_tiles(cm, a, y, t0, t1, EA_DOT_MADD);
}
AVX2 void ea_sparse_tiles_avx2_vnni(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    sparse_tiles(cm, a, y, t0, t1, EA_DOT_VNNI_VEX);
}
AVX2 void ea_sparse_tiles_avx2_evex(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    sparse_tiles(cm, a, y, t0, t1, EA_DOT_VNNI_EVEX);
}

/* ---- output-row subset: four listed rows at a time from the file layout ---- */
AVX2 static inline __m128i hsum4(__m256i d0, __m256i d1, __m256i d2, __m256i d3) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(d0, d1), _mm256_hadd_epi32(d2, d3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

AVX2 void ea_rows_avx2(const ea_qweight *w, const ea_qact *a, const int32_t *rows, int n_rows, float *y) {
    const int bs = w->block_size, nb = w->n_blocks, bpb = bs * w->bits / 8;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < n_rows; i += 4) {
        int n[4];
        const uint8_t *rp[4];
        for (int r = 0; r < 4; r++) {
            n[r] = rows[i + r < n_rows ? i + r : i]; /* a short last quad repeats a row */
            rp[r] = w->data + (size_t)n[r] * nb * bpb;
        }
        /* the next quad's rows, one block ahead of use per row: listed rows are scattered, so
         * no hardware prefetcher follows them (from memory this kernel ran at a third of the
         * dense GEMV's byte rate without it) */
        const uint8_t *np[4];
        for (int r = 0; r < 4; r++) np[r] = w->data + (size_t)ea_next_quad_row(rows, n_rows, i, r) * nb * bpb;
        __m128 acc = _mm_setzero_ps();
        for (int b = 0; b < nb; b++) {
            for (int r = 0; r < 4; r++)
                for (int o = 0; o < bpb; o += 64) _mm_prefetch((const char *)(np[r] + (size_t)b * bpb + o), _MM_HINT_T0);
            __m256i d[4];
            for (int r = 0; r < 4; r++) d[r] = _mm256_setzero_si256();
            for (int c = 0; c < bs / 32; c++) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a->xq + b * bs + c * 32));
                for (int r = 0; r < 4; r++) {
                    if (w->bits == 4) {
                        const __m256i wv = nibbles_even_odd(rp[r] + (size_t)b * bpb + c * 16);
                        d[r] = _mm256_add_epi32(d[r], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x), ones));
                    } else {
                        const __m256i ws = _mm256_xor_si256(
                            _mm256_loadu_si256((const __m256i *)(rp[r] + (size_t)b * bpb + c * 32)),
                            _mm256_set1_epi8((char)0x80));
                        d[r] = _mm256_add_epi32(d[r], _mm256_madd_epi16(
                            _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws)), ones));
                    }
                }
            }
            const int off = w->bits == 8 ? 128 : 0;
            const __m128i corr = _mm_setr_epi32(off - ea_qweight_zp(w, n[0], b), off - ea_qweight_zp(w, n[1], b),
                                                off - ea_qweight_zp(w, n[2], b), off - ea_qweight_zp(w, n[3], b));
            const __m128i idot = _mm_add_epi32(hsum4(d[0], d[1], d[2], d[3]),
                                               _mm_mullo_epi32(corr, _mm_set1_epi32(a->sumx[b])));
            const __m128 sw = _mm_setr_ps(w->scales[(size_t)n[0] * nb + b], w->scales[(size_t)n[1] * nb + b],
                                          w->scales[(size_t)n[2] * nb + b], w->scales[(size_t)n[3] * nb + b]);
            acc = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(a->sx[b]), sw), _mm_cvtepi32_ps(idot), acc);
            if (w->has_minimums) { /* codes with zero point 0 above (ea_qweight_zp), then the minimum term */
                const __m128 mn = _mm_setr_ps(w->minimums[(size_t)n[0] * nb + b], w->minimums[(size_t)n[1] * nb + b],
                                              w->minimums[(size_t)n[2] * nb + b], w->minimums[(size_t)n[3] * nb + b]);
                acc = _mm_fmadd_ps(mn, _mm_set1_ps(a->sx[b] * (float)a->sumx[b]), acc);
            }
        }
        float tmp[4];
        _mm_storeu_ps(tmp, acc);
        for (int r = 0; r < 4 && i + r < n_rows; r++) y[n[r]] = tmp[r];
    }
}

/* ea_sparsify, 8 channels a step: the kept ones' indices are packed to the
 * front 4 at a time (the 4-bit keep mask picks a lane permutation) and stored
 * whole; na never passes k, so the 4 stored lanes stay inside active[0, n). */
/* The loop with the threshold (uthr: one for all) and column-scale (ones: none) loads the
 * caller's arrays need, specialized by the constant flags of each call below. */
AVX2 static inline __attribute__((always_inline)) int sparsify_body(const float *x, const float *thr, const float *col_scale,
                                                                   int n, float *y, int32_t *active, int uthr, int ones) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), t1 = _mm256_set1_ps(uthr && n > 0 ? thr[0] : 0.0f);
    const __m128i lanes = _mm_setr_epi32(0, 1, 2, 3), four = _mm_set1_epi32(4);
    int na = 0, k = 0;
    for (; k + 8 <= n; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        __m256 score = _mm256_and_ps(v, absmask);
        if (!ones) score = _mm256_mul_ps(score, _mm256_loadu_ps(col_scale + k));
        const __m256 keep = _mm256_cmp_ps(score, uthr ? t1 : _mm256_loadu_ps(thr + k), _CMP_GE_OQ); /* false for NaN */
        _mm256_storeu_ps(y + k, _mm256_and_ps(v, keep));
        const int m = _mm256_movemask_ps(keep);
        const __m128i lo = _mm_add_epi32(_mm_set1_epi32(k), lanes), hi = _mm_add_epi32(lo, four);
        __m128i sel = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)ea_keep4_lanes[m & 15]));
        _mm_storeu_si128((__m128i *)(active + na), _mm_castps_si128(_mm_permutevar_ps(_mm_castsi128_ps(lo), sel)));
        na += ea_keep4_count[m & 15];
        sel = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)ea_keep4_lanes[m >> 4]));
        _mm_storeu_si128((__m128i *)(active + na), _mm_castps_si128(_mm_permutevar_ps(_mm_castsi128_ps(hi), sel)));
        na += ea_keep4_count[m >> 4];
    }
    return na + ea_sparsify_scalar(x, thr, !uthr, col_scale, k, n, y, active + na);
}

AVX2 int ea_sparsify_avx2(const float *x, const float *thr, int thr_step, const float *col_scale, int n, float *y,
                          int32_t *active) {
    if (!col_scale) return thr_step ? sparsify_body(x, thr, NULL, n, y, active, 0, 1) : sparsify_body(x, thr, NULL, n, y, active, 1, 1);
    return thr_step ? sparsify_body(x, thr, col_scale, n, y, active, 0, 0) : sparsify_body(x, thr, col_scale, n, y, active, 1, 0);
}

/* ---- ea_sparse_prep_scalar's arrays, 8 entries a step ----
 * The step every sparse GEMV runs on one thread before its tiles (in scalar code
 * amax's compare chain, the rounding and the quad loop dominate: docs/performance.md,
 * "serial preparation"). Gathers feed the block's amax and
 * quantization (cvtps rounds to nearest even, as nearbyintf and ea_quantize_row_avx2);
 * the kept entries are packed 4 lanes at a time as ea_sparsify packs indices. */

/* x at the active entries j .. j+7 of a block ending at e (lanes past e: index and value 0). */
AVX2 static inline __m256 gather_active8(const float *x, const int32_t *active, int j, int e, __m256i *idx) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(e - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    *idx = _mm256_maskload_epi32(active + j, m);
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, *idx, _mm256_castsi256_ps(m), 4);
}

/* The kept (nonzero q) lanes of 4 to ch + n and q + n (4 lanes stored whole); returns the count. */
AVX2 static inline int pack_kept4(__m128i idx, __m128i q, int32_t *ch, int8_t *qo) {
    const int m = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(q, _mm_setzero_si128()))) ^ 15;
    const __m128i sel = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)ea_keep4_lanes[m]));
    _mm_storeu_si128((__m128i *)ch, _mm_castps_si128(_mm_permutevar_ps(_mm_castsi128_ps(idx), sel)));
    const __m128i qs = _mm_castps_si128(_mm_permutevar_ps(_mm_castsi128_ps(q), sel));
    const int packed = _mm_cvtsi128_si32(_mm_packs_epi16(_mm_packs_epi32(qs, qs), _mm_setzero_si128()));
    memcpy(qo, &packed, 4);
    return ea_keep4_count[m];
}

AVX2 void ea_sparse_prep_avx2(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes,
                              ea_sparse_act *a) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
    const __m256i lo8 = _mm256_set1_epi32(-128), hi8 = _mm256_set1_epi32(127);
    const __m256i rb = _mm256_set1_epi64x((long long)row_bytes); /* < 2^29: mul_epu32 takes the low 32 bits */
    a->n_blocks = 0;
    int i = 0, out = 0, nq = 0;
    while (i < n_active) {
        const int b = active[i] / bs, b_end = (b + 1) * bs; /* the list ascends */
        int e = i;
        while (e + 8 <= n_active && active[e + 7] < b_end) e += 8;
        while (e < n_active && active[e] < b_end) e++;
        __m256 amax8 = _mm256_setzero_ps(), fin8 = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for (int j = i; j < e; j += 8) {
            __m256i idx;
            const __m256 v = _mm256_and_ps(absmask, gather_active8(x, active, j, e, &idx));
            fin8 = _mm256_and_ps(fin8, _mm256_cmp_ps(v, big, _CMP_LE_OQ));
            amax8 = _mm256_max_ps(amax8, v);
        }
        const int finite = _mm256_movemask_ps(fin8) == 0xFF;
        const float amax = ea_hmax8_ps(amax8);
        float inv = finite && amax != 0.0f ? 127.0f / amax : 0.0f;
        if (inv > FLT_MAX) inv = 0.0f;
        if (!finite || inv != 0.0f) {
            const int start = out;
            __m256i sum8 = _mm256_setzero_si256();
            const __m256 inv8 = _mm256_set1_ps(inv);
            for (int j = i; j < e && finite; j += 8) {
                __m256i idx;
                const __m256 v = gather_active8(x, active, j, e, &idx);
                const __m256i q = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v, inv8)), lo8), hi8);
                sum8 = _mm256_add_epi32(sum8, q);
                if (e - j >= 8) { /* whole: 4 stored lanes stay below j + 8 <= n_active */
                    out += pack_kept4(_mm256_castsi256_si128(idx), _mm256_castsi256_si128(q), a->ch + out, a->q + out);
                    out += pack_kept4(_mm256_extracti128_si256(idx, 1), _mm256_extracti128_si256(q, 1), a->ch + out,
                                      a->q + out);
                } else {
                    int32_t qv[8];
                    _mm256_storeu_si256((__m256i *)qv, q);
                    for (int l = 0; l < e - j; l++) {
                        a->ch[out] = active[j + l];
                        a->q[out] = (int8_t)qv[l];
                        out += qv[l] != 0;
                    }
                }
            }
            a->blk[a->n_blocks] = b;
            a->start[a->n_blocks] = start;
            a->sx[a->n_blocks] = finite ? amax / 127.0f : NAN;
            a->sumx[a->n_blocks] = ea_hsum8_epi32(sum8);
            a->qstart[a->n_blocks++] = nq;
            int s = start;
            for (; s + 4 <= out; s += 4, nq++) {
                const __m256i c4 = _mm256_cvtepu32_epi64(_mm_loadu_si128((const __m128i *)(a->ch + s)));
                _mm256_storeu_si256((__m256i *)(a->qoff + 4 * (size_t)nq), _mm256_mul_epu32(c4, rb));
                memcpy(&a->qx[nq], a->q + s, 4);
            }
            if (s < out) { /* a short quad repeats its first channel with value 0 */
                uint32_t packed = 0;
                for (int c = 0; c < 4; c++) {
                    a->qoff[4 * (size_t)nq + c] = (size_t)a->ch[s + c < out ? s + c : s] * row_bytes;
                    if (s + c < out) packed |= (uint32_t)(uint8_t)a->q[s + c] << (8 * c);
                }
                a->qx[nq++] = (int32_t)packed;
            }
        }
        i = e;
    }
    a->start[a->n_blocks] = out;
    a->qstart[a->n_blocks] = nq;
}
#endif
