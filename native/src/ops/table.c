/* The op table: op kind -> entry (ops/list.h), and the lookup the planner uses. */
#include <stdio.h>
#include <string.h>

#include "ops.h"

static int run_nop(ea_exec *x) {
    (void)x;
    return EA_KOK;
}
const ea_op ea_op_nop = {NULL, NULL, NULL, run_nop, 0};

const ea_op *const ea_ops[OP_COUNT] = {
#define EA_OP(KIND, name) [OP_##KIND] = &ea_op_##name,
#include "list.h"
#undef EA_OP
};

static int same_domain(const char *a, const char *b) {
    if (!strcmp(a, "ai.onnx")) a = "";
    if (!strcmp(b, "ai.onnx")) b = "";
    return !strcmp(a, b);
}

int ea_op_find(const char *domain, const char *op_type) {
    for (int k = 0; k < OP_COUNT; k++)
        if (ea_ops[k]->plan && same_domain(ea_ops[k]->domain, domain) && !strcmp(ea_ops[k]->op_type, op_type))
            return k;
    return -1;
}

void ea_op_supported(char *list, size_t cap) {
    size_t n = 0;
    list[0] = 0;
    for (int k = 0; k < OP_COUNT; k++) {
        const ea_op *op = ea_ops[k];
        if (!op->plan || n + 64 > cap) continue;
        n += (size_t)snprintf(list + n, cap - n, "%s%s%s%s", n ? ", " : "", op->domain, *op->domain ? "." : "",
                              op->op_type);
    }
}
