/* The scalar reference of MatMulNBits at accuracy_level 4 (the specification the SIMD
 * kernels match bit for bit): activation quantization and rows of the product. Per output
 * (m, n): acc = 0; for each block b: acc = fma(sx[m,b] * sw[n,b], (float)idot, acc), with
 * idot = sum_k xq*wq - zp*sumx[m,b] exact in int32, so any lane order inside a block gives the
 * same bits.
 * Float minimums (zp 0): then acc = fma(mn[n,b], sx[m,b] * (float)sumx[m,b], acc), the
 * minimum times the block sum of the quantized activations, as llama.cpp's Q4_1 x Q8_1 dot:
 * the block's weights q*sw + mn against the int8 activations, which is what the codes' term
 * already assumes (a float sum of x would mix rounded and unrounded activations, and cost
 * another pass over x). */
#include <float.h>
#include <math.h>
#include <string.h>

#include "../internal.h"

void ea_quantize_row_scalar(const float *x, int K, int bs, int8_t *xq, float *sx, int32_t *sumx,
                            int interleave) {
    const int nb = (K + bs - 1) / bs;
    for (int b = 0; b < nb; b++) {
        const int k0 = b * bs, len = K - k0 < bs ? K - k0 : bs;
        float amax = 0.0f;
        int finite = 1;
        for (int i = 0; i < len; i++) {
            const float a = fabsf(x[k0 + i]);
            finite &= a <= FLT_MAX; /* false for inf and nan */
            amax = fmaxf(amax, a);
        }
        /* onnxruntime (MLAS QuantizeARow_CompInt8): scale = amax/127 but the
         * codes use 127/amax, not 1/scale; the two differ by an ulp often
         * enough to move exact ties (fp16/Q8_0 embeddings make many). A
         * block holding inf/nan gets codes 0 and a nan scale, so every
         * output it feeds is nan (as in float math) without converting a
         * non-finite float to int. */
        const float scale = finite ? amax / 127.0f : NAN;
        float inv = finite && amax != 0.0f ? 127.0f / amax : 0.0f;
        if (inv > FLT_MAX) inv = 0.0f; /* amax < 4e-37: the block counts as zero */
        int32_t sum = 0;
        int8_t *q = xq + k0;
        for (int i = 0; i < bs; i++) {
            int v = 0;
            if (i < len && inv != 0.0f) { /* finite block: |x*inv| <= 127 + rounding */
                const float r = nearbyintf(x[k0 + i] * inv);
                v = r > 127.0f ? 127 : r < -128.0f ? -128 : (int)r;
            }
            sum += v;
            /* even elements of each 32-chunk first, then the odd ones */
            int pos = interleave ? (i & ~31) + ((i & 1) ? 16 : 0) + ((i & 31) >> 1) : i;
            q[pos] = (int8_t)v;
        }
        sx[b] = scale;
        sumx[b] = sum;
    }
}

/* The nibble/byte of row n, element k (file layout). */
static inline int wq_at(const ea_qweight *w, int n, int k) {
    const size_t row = (size_t)n * w->n_blocks * w->block_size; /* elements */
    if (w->bits == 8) return w->data[row + k];
    uint8_t byte = w->data[(row + k) / 2];
    return (k & 1) ? byte >> 4 : byte & 15;
}

void ea_qmatmul_rows_scalar(const ea_qweight *w, const ea_qact *a, float *y, int n0, int n1) {
    const int bs = w->block_size, nb = w->n_blocks, kp = nb * bs;
    for (int m = 0; m < a->M; m++) {
        const int8_t *xq = a->xq + (size_t)m * kp;
        for (int n = n0; n < n1; n++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                int32_t dot = 0;
                for (int i = 0; i < bs; i++) dot += (int32_t)xq[b * bs + i] * wq_at(w, n, b * bs + i);
                dot -= ea_qweight_zp(w, n, b) * a->sumx[(size_t)m * nb + b];
                const float s = a->sx[(size_t)m * nb + b] * w->scales[(size_t)n * nb + b];
                acc = fmaf(s, (float)dot, acc);
                if (w->has_minimums)
                    acc = fmaf(w->minimums[(size_t)n * nb + b],
                               a->sx[(size_t)m * nb + b] * (float)a->sumx[(size_t)m * nb + b], acc);
            }
            y[(size_t)m * w->N + n] = acc;
        }
    }
}
