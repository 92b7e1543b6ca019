/* The machine and the environment, read in one place (platform.h). */
#define _GNU_SOURCE
#include "platform.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../include/edgeact.h"

static int count_physical_cores(void) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online < 1) online = 1;
    int seen[1024][2], n = 0;
    for (long c = 0; c < online && c < 1024; c++) {
        char path[128];
        int ids[2] = {-1, -1};
        const char *names[2] = {"physical_package_id", "core_id"};
        for (int k = 0; k < 2; k++) {
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%ld/topology/%s", c, names[k]);
            FILE *f = fopen(path, "r");
            if (!f) return (int)online;
            if (fscanf(f, "%d", &ids[k]) != 1) ids[k] = -1;
            fclose(f);
        }
        int dup = 0;
        for (int i = 0; i < n && !dup; i++) dup = seen[i][0] == ids[0] && seen[i][1] == ids[1];
        if (!dup) {
            seen[n][0] = ids[0];
            seen[n][1] = ids[1];
            n++;
        }
    }
    return n > 0 ? n : (int)online;
}

/* An unknown cache keeps the prompt-rows path (sparse/matmul.c) to small matmuls. */
static size_t last_level_cache(void) {
    long b = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    b = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (b <= 0) b = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return b > 0 ? (size_t)b : (size_t)1 << 20;
}

/* A switch in the environment: set, non-empty and not "0". */
static int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static ea_platform_info machine;
static pthread_once_t machine_once = PTHREAD_ONCE_INIT;

static void probe(void) {
    machine.physical_cores = count_physical_cores();
    machine.llc_bytes = last_level_cache();
    machine.hugepages = !env_flag("EDGEACT_NO_HUGEPAGE");
}

const ea_platform_info *ea_platform(void) {
    pthread_once(&machine_once, probe);
    return &machine;
}

void ea_settings_read(ea_settings *s) {
    memset(s, 0, sizeof *s);
    const char *isa = getenv("EDGEACT_ISA");
    if (isa) snprintf(s->isa, sizeof s->isa, "%s", isa);
    s->no_avx512 = env_flag("EDGEACT_NO_AVX512");
    s->no_vnni = env_flag("EDGEACT_NO_VNNI");
    s->sparse_always = env_flag("EDGEACT_SPARSE_ALWAYS");
    s->sparse_static = env_flag("EDGEACT_SPARSE_STATIC");
    s->sparse_lowmem = env_flag("EDGEACT_SPARSE_LOWMEM");
    s->no_kept_rows = env_flag("EDGEACT_NO_KEPT_ROWS");
}

int ea_physical_cores(void) { return ea_platform()->physical_cores; }
