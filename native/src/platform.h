/* The machine and the environment, read in one place.
 *
 * ea_platform(): facts about the machine, probed once per process (the first call).
 * ea_settings_read(): every EDGEACT_* switch, read from the environment when a model is
 * loaded (a process may load models under different settings; tests do). Nothing else in
 * the library calls getenv or probes the machine. docs/runtime.md lists them in one table. */
#ifndef EDGEACT_PLATFORM_H
#define EDGEACT_PLATFORM_H

#include <stddef.h>

typedef struct ea_platform_info {
    int physical_cores;  /* distinct (package, core) pairs; SMT siblings share a core's SIMD units */
    size_t llc_bytes;    /* last-level cache (sysconf), 1 MiB when the C library does not say */
    int hugepages;       /* weight repacks of 2 MiB or more ask for transparent huge pages
                          * (0 when EDGEACT_NO_HUGEPAGE is set: read once, with the machine) */
} ea_platform_info;

const ea_platform_info *ea_platform(void);

typedef struct ea_settings {
    char isa[32];        /* EDGEACT_ISA: force a kernel variant ("" = the best available) */
    int no_avx512;       /* EDGEACT_NO_AVX512: skip avx512-vnni when choosing */
    int no_vnni;         /* EDGEACT_NO_VNNI: skip the VNNI variants when choosing */
    int sparse_always;   /* EDGEACT_SPARSE_ALWAYS: sparse GEMV paths always (tests) */
    int sparse_static;   /* EDGEACT_SPARSE_STATIC: the fixed crossover instead of the measured one */
    int sparse_lowmem;   /* EDGEACT_SPARSE_LOWMEM: as the load flag EA_LOAD_SPARSE_LOWMEM */
    int no_kept_rows;    /* EDGEACT_NO_KEPT_ROWS: CoreInfer without its kept-row copies (tests) */
} ea_settings;

void ea_settings_read(ea_settings *s);

#endif
