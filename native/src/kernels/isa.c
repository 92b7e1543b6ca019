/* The kernel variants of this build, the choice among them, the kernel context and its
 * scratch memory. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../platform.h"
#include "internal.h"

const char *ea_kernels_strerror(int code) {
    switch (code) {
    case EA_KOK: return "ok";
    case EA_KERR_ISA_UNKNOWN:
        return "unknown ISA name (expected scalar, avx2, avx2-vnni, avx512-vnni, neon or neon-dotprod)";
    case EA_KERR_ISA_UNAVAILABLE: return "requested ISA is not supported by this CPU or build";
    case EA_KERR_ARG: return "invalid kernel argument (shape, bits, block size or index out of range)";
    case EA_KERR_NOMEM: return "out of memory in a kernel";
    case EA_KERR_LAYOUT: return "weight was prepared for a different ISA than the kernel context";
    default: return "unknown kernel error";
    }
}

/* The variants of this build, best first. */
static const ea_kernel_table *const tables[] = {
#if EA_X86
    &ea_kernels_avx512_vnni, &ea_kernels_avx2_vnni, &ea_kernels_avx2,
#endif
#if EA_ARM64
    &ea_kernels_neon_dotprod, &ea_kernels_neon,
#endif
    &ea_kernels_scalar,
};
enum { N_TABLES = sizeof tables / sizeof tables[0] };

const ea_kernel_table *ea_kernel_table_of(ea_isa isa) {
    for (int i = 0; i < N_TABLES; i++)
        if (tables[i]->isa == isa) return tables[i];
    return NULL;
}

int ea_isa_list(ea_isa *out, int cap) {
    int n = 0;
    for (int i = 0; i < N_TABLES && n < cap; i++) out[n++] = tables[i]->isa;
    return n;
}

int ea_isa_available(ea_isa isa) {
    const ea_kernel_table *t = ea_kernel_table_of(isa);
    return t && t->available();
}

const char *ea_isa_name(ea_isa isa) {
    switch (isa) {
    case EA_ISA_SCALAR: return "scalar";
    case EA_ISA_AVX2: return "avx2";
    case EA_ISA_AVX2_VNNI: return "avx2-vnni";
    case EA_ISA_AVX512_VNNI: return "avx512-vnni";
    case EA_ISA_NEON: return "neon";
    case EA_ISA_NEON_DOTPROD: return "neon-dotprod";
    default: return "unknown";
    }
}

int ea_isa_parse(const char *name, ea_isa *out) {
    static const ea_isa all[] = {EA_ISA_SCALAR,      EA_ISA_AVX2, EA_ISA_AVX2_VNNI, EA_ISA_AVX512_VNNI,
                                 EA_ISA_NEON,        EA_ISA_NEON_DOTPROD};
    if (!name) return EA_KERR_ISA_UNKNOWN;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (strcmp(name, ea_isa_name(all[i])) == 0) {
            if (!ea_isa_available(all[i])) return EA_KERR_ISA_UNAVAILABLE;
            *out = all[i];
            return EA_KOK;
        }
    }
    return EA_KERR_ISA_UNKNOWN;
}

static ea_isa best(int no_avx512, int no_vnni) {
    for (int i = 0; i < N_TABLES; i++) {
        const ea_isa isa = tables[i]->isa;
        if ((no_avx512 && isa == EA_ISA_AVX512_VNNI) ||
            (no_vnni && (isa == EA_ISA_AVX512_VNNI || isa == EA_ISA_AVX2_VNNI)))
            continue;
        if (tables[i]->available()) return isa;
    }
    return EA_ISA_SCALAR;
}

ea_isa ea_isa_detect(void) { return best(0, 0); }

int ea_isa_choose(const char *forced, int no_avx512, int no_vnni, ea_isa *out) {
    if (forced && *forced) return ea_isa_parse(forced, out);
    *out = best(no_avx512, no_vnni);
    return EA_KOK;
}

int ea_isa_select(ea_isa *out) {
    ea_settings set;
    ea_settings_read(&set);
    return ea_isa_choose(set.isa, set.no_avx512, set.no_vnni, out);
}

int ea_kctx_init(ea_kctx *ctx, ea_isa isa, ea_pool *pool) {
    memset(ctx, 0, sizeof *ctx);
    if (!ea_isa_available(isa)) return EA_KERR_ISA_UNAVAILABLE;
    ctx->isa = isa;
    ctx->k = ea_kernel_table_of(isa);
    ctx->pool = pool;
    return EA_KOK;
}

void ea_kctx_release(ea_kctx *ctx) {
    free(ctx->scratch);
    free(ctx->masked);
    ctx->scratch = NULL;
    ctx->scratch_cap = 0;
    ctx->masked = NULL;
    ctx->masked_cap = 0;
}

/* Weight repacks are read once per token from end to end: with 4 KiB pages
 * the sparse kernels' jumps between channel rows miss the TLB on most rows,
 * so repacks of 2 MiB or more ask for transparent huge pages (Linux, where
 * THP is "madvise"). Only whole 2 MiB pages are advised, so the resident
 * size stays the repack's size. EDGEACT_NO_HUGEPAGE turns it off (platform.h). */
void *ea_alloc_weights(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    void *p = NULL;
    if (bytes >= huge && ea_platform()->hugepages) {
        if (posix_memalign(&p, huge, bytes)) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        madvise(p, bytes & ~(huge - 1), MADV_HUGEPAGE);
#endif
    } else if (posix_memalign(&p, 64, bytes ? bytes : 1)) {
        return NULL;
    }
    memset(p, 0, bytes);
    return p;
}

void *ea_scratch(ea_kctx *ctx, size_t bytes) {
    if (bytes <= ctx->scratch_cap) return ctx->scratch;
    size_t cap = bytes + bytes / 2;
    cap = (cap + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, cap);
    if (!p) return NULL;
    free(ctx->scratch);
    ctx->scratch = p;
    ctx->scratch_cap = cap;
    return p;
}
