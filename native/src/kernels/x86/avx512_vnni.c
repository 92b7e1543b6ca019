/* The AVX-512 VNNI kernel table (AVX512 F, BW, VL, VNNI besides AVX2): the int4 matmul and the
 * input-sparse tile pairs on zmm registers (x86/qmatmul_avx512.c, x86/sparse_avx512.c), the
 * rest on the AVX2 code with vpdpbusd in its EVEX form. */
#include "../internal.h"

#if EA_X86
static int available(void) {
    return ea_cpu_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

const ea_kernel_table ea_kernels_avx512_vnni = {
    .isa = EA_ISA_AVX512_VNNI,
    .available = available,
    .quantize_row = ea_quantize_row_avx2,
    .qmatmul = ea_qmatmul_avx512_vnni,
    .dequant_row = ea_dequant_row_avx2,
    .dot = ea_dot_avx2,
    .matmul_f32 = ea_matmul_f32_avx2,
    .matmul_f16 = ea_matmul_f16_avx2,
    .f16_row = ea_f16_row_avx2,
    .attention_row = ea_attention_row_avx2,
    .silu_mul = ea_silu_mul_avx2,
    .gelu_tanh = ea_gelu_tanh_avx512,
    .sparsify = ea_sparsify_avx2,
    .sparse_prep = ea_sparse_prep_avx2,
    .sparse_tiles = ea_sparse_tiles_avx512_vnni,
    .qgemv_rows = ea_rows_avx2,
};
#endif
