/* Input-sparse GEMV with AVX-512 VNNI (semantics: sparse.c), the avx512-vnni
 * table's tiles (x86/avx512_vnni.c). Same scheme and the same
 * integers as sparse_avx2.c, on two 64-row tiles at once: a tile pair of a
 * channel is one 64-byte line, and the per-128-bit-lane unpacks leave tile
 * t in the low half of every vector and tile t+1 in the high half, each in
 * the AVX2 kernel's row order, so the channel-major layout is unchanged. Half
 * the instructions per weight: decode at high sparsity is bound by these
 * ops as much as by memory (bench_kernels with BENCH_HOT). */
#include "../internal.h"

#if EA_X86
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* Eight per-row values (scales or minimums) of tile t (p) and of tile t+1 (p + 64 rows) as one vector. */
AVX512 static inline __m512 load16_scales(const uint8_t *p, int f16) {
    if (f16) {
        const __m256i h = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + 128)), _mm_loadu_si128((const __m128i *)p));
        return _mm512_cvtph_ps(h);
    }
    const __m512d lo = _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps((const float *)p)));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_loadu_ps((const float *)p + EA_CM_TILE)), 1));
}

AVX512 static inline __m512i load16_zp(const uint8_t *p) {
    const __m128i z = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)p), _mm_loadl_epi64((const __m128i *)(p + EA_CM_TILE)));
    return _mm512_cvtepu8_epi32(z);
}

/* Tiles [t0, t1), t1 - t0 even. */
AVX512 static void sparse_pairs(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int f16 = cm->scales_f16, mf16 = cm->minimums_f16;
    const size_t ssize = f16 ? 2 : 4, msize = mf16 ? 2 : 4;
    const uint8_t *mins = cm->minimums;
    float *accbuf = a->acc;
    int32_t *dbuf = a->dacc;
    for (int t = t0; t < t1; t++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(accbuf + t * EA_CM_TILE + 16 * v, _mm512_setzero_ps());
    for (int ab = 0; ab < a->n_blocks; ab++) {
        const int q0 = a->qstart[ab], q1 = a->qstart[ab + 1];
        const int qn = ab + 1 < a->n_blocks ? a->qstart[ab + 2] : q1;
        const __m512i sumx = _mm512_set1_epi32(a->sumx[ab]);
        /* -8 sumx; with float minimums the codes' zero point is 0 */
        const __m512i nz = mins ? _mm512_setzero_si512() : _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sumx, 3));
        const __m512i nz16 = _mm512_slli_epi32(nz, 4);
        const __m512 sx = _mm512_set1_ps(a->sx[ab]);
        const __m512 sxsum = _mm512_set1_ps(a->sx[ab] * (float)a->sumx[ab]); /* the minimums' factor */
        for (int c0 = q0;; c0 += EA_SPARSE_CHUNK_QUADS) {
            const ea_sparse_chunk ch = ea_sparse_chunk_at(q0, q1, qn, c0);
            const int c1 = ch.c1, first = ch.first, last = ch.last;
            for (int t = t0; t < t1; t += 2) {
                const uint8_t *base = cm->data + (size_t)t * (EA_CM_TILE / 2);
                const ea_sparse_pf pf = ea_sparse_pf_at(ch, c0, t, t0, t1); /* one line per row: a tile pair */
                const uint8_t *pbase = cm->data + (size_t)pf.t * (EA_CM_TILE / 2);
                for (int q = pf.q0; q < pf.q1; q++)
                    for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(pbase + a->qoff[4 * (size_t)q + c]), _MM_HINT_T0);
                if (last && ab + 1 < a->n_blocks) {
                    const size_t nsb = (size_t)a->blk[ab + 1] * cm->n_pad + (size_t)t * EA_CM_TILE;
                    const char *ns = (const char *)cm->scales + nsb * ssize;
                    for (size_t off = 0; off < 2 * EA_CM_TILE * ssize; off += 64) _mm_prefetch(ns + off, _MM_HINT_T0);
                    if (cm->zero_points) {
                        _mm_prefetch((const char *)(cm->zero_points + nsb), _MM_HINT_T0);
                        _mm_prefetch((const char *)(cm->zero_points + nsb + 64), _MM_HINT_T0);
                    }
                    for (size_t off = 0; mins && off < 2 * EA_CM_TILE * msize; off += 64)
                        _mm_prefetch((const char *)(mins + nsb * msize + off), _MM_HINT_T0);
                }
                const size_t sb = (size_t)a->blk[ab] * cm->n_pad + (size_t)t * EA_CM_TILE;
                int32_t *dt = dbuf + (size_t)t * EA_CM_TILE;
                __m512i d0 = nz, d1 = nz16, d2 = nz, d3 = nz16, d4 = nz, d5 = nz16, d6 = nz, d7 = nz16;
                if (!first) {
                    d0 = _mm512_loadu_si512(dt); d1 = _mm512_loadu_si512(dt + 16);
                    d2 = _mm512_loadu_si512(dt + 32); d3 = _mm512_loadu_si512(dt + 48);
                    d4 = _mm512_loadu_si512(dt + 64); d5 = _mm512_loadu_si512(dt + 80);
                    d6 = _mm512_loadu_si512(dt + 96); d7 = _mm512_loadu_si512(dt + 112);
                } else if (cm->zero_points) {
                    __m512i z[8];
                    for (int v = 0; v < 8; v++) {
                        const __m512i zs = _mm512_mullo_epi32(load16_zp(cm->zero_points + sb + 8 * v), sumx);
                        z[v] = _mm512_sub_epi32(_mm512_setzero_si512(), (v & 1) ? _mm512_slli_epi32(zs, 4) : zs);
                    }
                    d0 = z[0]; d1 = z[1]; d2 = z[2]; d3 = z[3]; d4 = z[4]; d5 = z[5]; d6 = z[6]; d7 = z[7];
                }
                for (int q = c0; q < c1; q++) {
                    const size_t *o = a->qoff + 4 * (size_t)q;
                    const __m512i w0 = _mm512_loadu_si512(base + o[0]), w1 = _mm512_loadu_si512(base + o[1]);
                    const __m512i w2 = _mm512_loadu_si512(base + o[2]), w3 = _mm512_loadu_si512(base + o[3]);
                    const __m512i u0 = _mm512_unpacklo_epi8(w0, w1), u1 = _mm512_unpackhi_epi8(w0, w1);
                    const __m512i u2 = _mm512_unpacklo_epi8(w2, w3), u3 = _mm512_unpackhi_epi8(w2, w3);
                    const __m512i x = _mm512_set1_epi32(a->qx[q]);
                    __m512i v = _mm512_unpacklo_epi16(u0, u2);
                    d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(v, m4), x);
                    d1 = _mm512_dpbusd_epi32(d1, _mm512_andnot_si512(m4, v), x);
                    v = _mm512_unpackhi_epi16(u0, u2);
                    d2 = _mm512_dpbusd_epi32(d2, _mm512_and_si512(v, m4), x);
                    d3 = _mm512_dpbusd_epi32(d3, _mm512_andnot_si512(m4, v), x);
                    v = _mm512_unpacklo_epi16(u1, u3);
                    d4 = _mm512_dpbusd_epi32(d4, _mm512_and_si512(v, m4), x);
                    d5 = _mm512_dpbusd_epi32(d5, _mm512_andnot_si512(m4, v), x);
                    v = _mm512_unpackhi_epi16(u1, u3);
                    d6 = _mm512_dpbusd_epi32(d6, _mm512_and_si512(v, m4), x);
                    d7 = _mm512_dpbusd_epi32(d7, _mm512_andnot_si512(m4, v), x);
                }
                if (!last) {
                    _mm512_storeu_si512(dt, d0); _mm512_storeu_si512(dt + 16, d1);
                    _mm512_storeu_si512(dt + 32, d2); _mm512_storeu_si512(dt + 48, d3);
                    _mm512_storeu_si512(dt + 64, d4); _mm512_storeu_si512(dt + 80, d5);
                    _mm512_storeu_si512(dt + 96, d6); _mm512_storeu_si512(dt + 112, d7);
                    continue;
                }
                const __m512i d[8] = {d0, _mm512_srai_epi32(d1, 4), d2, _mm512_srai_epi32(d3, 4),
                                      d4, _mm512_srai_epi32(d5, 4), d6, _mm512_srai_epi32(d7, 4)};
                for (int v = 0; v < 8; v++) {
                    const __m512 s = _mm512_mul_ps(sx, load16_scales((const uint8_t *)cm->scales + (sb + 8 * v) * ssize, f16));
                    float *acc = accbuf + (size_t)t * EA_CM_TILE + 16 * v;
                    __m512 r = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(d[v]), _mm512_loadu_ps(acc));
                    if (mins) r = _mm512_fmadd_ps(load16_scales(mins + (sb + 8 * v) * msize, mf16), sxsum, r);
                    _mm512_storeu_ps(acc, r);
                }
            }
            if (last) break;
        }
    }
    /* accumulator e of a pair: vector e / 16, element e % 16 (tile t, then t+1); the row
     * map is worked out once per call (per tile pair it took a sixth of a small GEMV) */
    uint8_t row[2 * EA_CM_TILE];
    for (int e = 0; e < 2 * EA_CM_TILE; e++) {
        const int v = e / 16, i = e % 16;
        row[e] = (uint8_t)((i / 8) * EA_CM_TILE + ea_cm_lane_n(EA_ISA_AVX2, v * 8 + i % 8));
    }
    for (int t = t0; t < t1; t += 2) {
        const float *acc = accbuf + (size_t)t * EA_CM_TILE;
        float *yt = y + (size_t)t * EA_CM_TILE;
        const int rows = cm->N - t * EA_CM_TILE;
        if (rows >= 2 * EA_CM_TILE)
            for (int e = 0; e < 2 * EA_CM_TILE; e++) yt[row[e]] = acc[e];
        else
            for (int e = 0; e < 2 * EA_CM_TILE; e++)
                if (row[e] < rows) yt[row[e]] = acc[e];
    }
}

/* tile pairs here; an odd last tile on the AVX2 code (vpdpbusd EVEX) */
void ea_sparse_tiles_avx512_vnni(const ea_qweight_cm *cm, const ea_sparse_act *a, float *y, int t0, int t1) {
    const int t2 = t0 + ((t1 - t0) & ~1);
    if (t2 > t0) sparse_pairs(cm, a, y, t0, t2);
    if (t2 < t1) ea_sparse_tiles_avx2_evex(cm, a, y, t2, t1);
}

#endif
