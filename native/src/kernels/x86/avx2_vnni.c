/* The AVX2 + AVX-VNNI kernel table: AVX2's, with the integer dots of the quantized matmul and
 * the input-sparse tiles on vpdpbusd (VEX). */
#include "../internal.h"

#if EA_X86
static int available(void) { return ea_cpu_avx2() && __builtin_cpu_supports("avxvnni"); }

const ea_kernel_table ea_kernels_avx2_vnni = {
    .isa = EA_ISA_AVX2_VNNI,
    .available = available,
    .quantize_row = ea_quantize_row_avx2,
    .qmatmul = ea_qmatmul_avx2_vnni,
    .dequant_row = ea_dequant_row_avx2,
    .dot = ea_dot_avx2,
    .matmul_f32 = ea_matmul_f32_avx2,
    .matmul_f16 = ea_matmul_f16_avx2,
    .f16_row = ea_f16_row_avx2,
    .attention_row = ea_attention_row_avx2,
    .silu_mul = ea_silu_mul_avx2,
    .gelu_tanh = ea_gelu_tanh_avx2,
    .sparsify = ea_sparsify_avx2,
    .sparse_prep = ea_sparse_prep_avx2,
    .sparse_tiles = ea_sparse_tiles_avx2_vnni,
    .qgemv_rows = ea_rows_avx2,
};
#endif
