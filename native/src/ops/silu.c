/* SiLU, made by passes.c from Sigmoid(g) -> Mul(g, .) [-> Mul(., u)]: y = silu(g) [* u]. */
#include "ops.h"

static int run_silu_mul(ea_exec *x) {
    ea_silu_mul(&x->ss->kctx, x->a, x->b, x->n, x->y);
    return EA_KOK;
}

static int run_silu(ea_exec *x) {
    ea_silu_mul(&x->ss->kctx, x->a, NULL, x->n, x->y);
    return EA_KOK;
}

const ea_op ea_op_silu_mul = {NULL, NULL, NULL, run_silu_mul, 1};
const ea_op ea_op_silu = {NULL, NULL, NULL, run_silu, 1};
