/* The scalar kernel table: the references themselves, on any CPU. */
#include "../internal.h"

static int always(void) { return 1; }

static int sparsify(const float *x, const float *thr, int thr_step, const float *col_scale, int n, float *y,
                    int32_t *active) {
    return ea_sparsify_scalar(x, thr, thr_step, col_scale, 0, n, y, active);
}

static void sparse_prep(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes,
                        ea_sparse_act *a) {
    ea_sparse_prep_scalar(x, bs, active, n_active, row_bytes, 0, a);
}

const ea_kernel_table ea_kernels_scalar = {
    .isa = EA_ISA_SCALAR,
    .available = always,
    .quantize_row = ea_quantize_row_scalar,
    .qmatmul = ea_qmatmul_rows_scalar,
    .dequant_row = ea_dequant_row_scalar,
    .dot = ea_dot_scalar,
    .matmul_f32 = ea_matmul_f32_scalar,
    .matmul_f16 = ea_matmul_f16_scalar,
    .f16_row = ea_f16_row_scalar,
    .attention_row = ea_attention_row_scalar,
    .silu_mul = ea_silu_mul_scalar,
    .gelu_tanh = ea_gelu_tanh_scalar,
    .sparsify = sparsify,
    .sparse_prep = sparse_prep,
    .sparse_tiles = ea_sparse_tiles_scalar,
    .qgemv_rows = ea_rows_scalar,
};
