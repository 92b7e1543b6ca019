/* Every op the executor runs, one line each: EA_OP(KIND, name), where ops/NAME.c (or the
 * file named beside it) defines `const ea_op ea_op_NAME`. The list makes the op_kind enum
 * (OP_KIND), the declarations and the table (ops/table.c); adding an op is its file and one
 * line here. Ops made only by graph passes (SiluMul, Silu, the bias Add) have no ONNX
 * match of their own. */
EA_OP(GATHER, gather)
EA_OP(CAST, cast)
EA_OP(RMSNORM, rmsnorm)
EA_OP(MATMUL, matmul)
EA_OP(QMATMUL, matmul_nbits)
EA_OP(GQA, gqa)
EA_OP(ADD, add)             /* add.c */
EA_OP(ADD_BIAS, add_bias)   /* add.c: Add of an activation and an initializer */
EA_OP(MUL, mul)
EA_OP(SIGMOID, sigmoid)
EA_OP(SILU_MUL, silu_mul)   /* silu.c: Sigmoid/Mul/Mul fused (passes.c) */
EA_OP(SILU, silu)           /* silu.c: Sigmoid/Mul fused (passes.c) */
EA_OP(STEER, steer)
EA_OP(SPARSIFY, sparsify)
EA_OP(NEURON_MASK, neuron_mask)
EA_OP(GELU, gelu)
EA_OP(HEAD_RMSNORM, head_rmsnorm)
EA_OP(GATHER_BQ, gather_bq)  /* gather_block_quantized.c: the lookup in a tied model's one table */
EA_OP(RESHAPE, reshape)     /* of an initializer: a view, no step */
EA_OP(SLICE, slice)
EA_OP(TANH, tanh)           /* tanh.c */
EA_OP(DIV, div)             /* tanh.c: by a scalar initializer */
EA_OP(NOP, nop)             /* table.c: a node folded into another step (Cast of a weight, fused nodes) */
