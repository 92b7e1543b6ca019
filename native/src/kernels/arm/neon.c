/* The NEON kernel table (aarch64 baseline Advanced SIMD): integer dots by smull/sadalp. The
 * activation quantization, attention and SiLU are the scalar references, which the compiler
 * vectorizes. */
#include "../internal.h"

#if EA_ARM64
static int always(void) { return 1; }

static void sparse_prep(const float *x, int bs, const int32_t *active, int n_active, size_t row_bytes,
                        ea_sparse_act *a) {
    ea_sparse_prep_scalar(x, bs, active, n_active, row_bytes, 0, a);
}

const ea_kernel_table ea_kernels_neon = {
    .isa = EA_ISA_NEON,
    .available = always,
    .quantize_row = ea_quantize_row_scalar,
    .qmatmul = ea_qmatmul_neon,
    .dequant_row = ea_dequant_row_neon,
    .dot = ea_dot_neon,
    .matmul_f32 = ea_matmul_f32_neon,
    .matmul_f16 = ea_matmul_f16_neon,
    .f16_row = ea_f16_row_neon,
    .attention_row = ea_attention_row_scalar,
    .silu_mul = ea_silu_mul_scalar,
    .gelu_tanh = ea_gelu_tanh_neon,
    .sparsify = ea_sparsify_neon,
    .sparse_prep = sparse_prep,
    .sparse_tiles = ea_sparse_tiles_neon,
    .qgemv_rows = ea_rows_neon,
};
#endif
