/* model.onnx and its external data mapped into memory, and every initializer's
 * payload located, size-checked and (only when misaligned) copied. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model.h"
#include "weights.h"

struct ext_map {
    char *location;
    void *p;
    size_t n;
};

int ea_map_file(const char *path, void **p, size_t *n, ea_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ea_fail(err, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        close(fd);
        return ea_fail(err, "%s is not a regular file", path);
    }
    *n = (size_t)st.st_size;
    if (*n == 0) {
        close(fd);
        *p = NULL;
        return 0;
    }
    *p = mmap(NULL, *n, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (*p == MAP_FAILED) {
        *p = NULL;
        return ea_fail(err, "cannot map %s: %s", path, strerror(errno));
    }
    return 0;
}

/* location must name a file inside dir: relative, no "..", and after resolving
 * symlinks still under dir. */
static int open_external(ea_model *m, const char *dir, const onnx_tensor *t, struct ext_map **out, ea_err *err) {
    const char *loc = t->location;
    for (int i = 0; i < m->n_ext; i++)
        if (!strcmp(m->ext[i].location, loc)) {
            *out = &m->ext[i];
            return 0;
        }
    if (!dir) return ea_fail(err, "initializer '%s': external data '%s' but the model was not loaded from a folder",
                             t->name, loc);
    if (!*loc || loc[0] == '/' || strchr(loc, '\\'))
        return ea_fail(err, "initializer '%s': external data location '%s' must be a relative path inside the model folder",
                       t->name, loc);
    for (const char *s = loc; *s;) {
        const char *e = strchr(s, '/');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len == 2 && s[0] == '.' && s[1] == '.')
            return ea_fail(err, "initializer '%s': external data location '%s' leaves the model folder", t->name, loc);
        s += len + (e ? 1 : 0);
    }
    char path[PATH_MAX], real_dir[PATH_MAX], real_file[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, loc) >= sizeof path)
        return ea_fail(err, "initializer '%s': external data path too long", t->name);
    if (!realpath(dir, real_dir)) return ea_fail(err, "cannot resolve model folder %s: %s", dir, strerror(errno));
    if (!realpath(path, real_file))
        return ea_fail(err, "initializer '%s': external data file '%s' not found in the model folder", t->name, loc);
    size_t dl = strlen(real_dir);
    if (strncmp(real_file, real_dir, dl) || real_file[dl] != '/')
        return ea_fail(err, "initializer '%s': external data '%s' resolves outside the model folder", t->name, loc);
    struct ext_map *e = realloc(m->ext, sizeof *m->ext * (size_t)(m->n_ext + 1));
    if (!e) return ea_fail(err, "out of memory");
    m->ext = e;
    struct ext_map *x = &m->ext[m->n_ext];
    memset(x, 0, sizeof *x);
    if (ea_map_file(real_file, &x->p, &x->n, err)) return -1;
    x->location = strdup(loc);
    if (!x->location) {
        if (x->p) munmap(x->p, x->n);
        return ea_fail(err, "out of memory");
    }
    m->n_ext++;
    *out = x;
    return 0;
}

/* True when [p, p+n) lies in one of the model's read-only file mappings. */
static int in_mapping(const ea_model *m, const uint8_t *p, size_t n) {
    if (!m->map_owned && m->map && p >= (const uint8_t *)m->map && n <= m->map_len &&
        (size_t)(p - (const uint8_t *)m->map) <= m->map_len - n)
        return 1;
    for (int i = 0; i < m->n_ext; i++) {
        const uint8_t *b = m->ext[i].p;
        if (b && p >= b && n <= m->ext[i].n && (size_t)(p - b) <= m->ext[i].n - n) return 1;
    }
    return 0;
}

/* Drops the pages wholly inside [p, p+n) from the resident set once their
 * bytes have been repacked or copied. Only file mappings qualify: they are
 * private and never written, so a later read faults the bytes back in from
 * the file, which keeps this safe if a neighbouring tensor shares a page. */
void ea_release_pages(const ea_model *m, const void *p, size_t n) {
    static long page;
    if (!page) page = sysconf(_SC_PAGESIZE);
    if (!p || page <= 0 || n < (size_t)page || !in_mapping(m, p, n)) return;
    uintptr_t a = ((uintptr_t)p + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)(page - 1);
    if (e > a) madvise((void *)a, e - a, MADV_DONTNEED);
}

void ea_unmap_external(ea_model *m) {
    for (int i = 0; i < m->n_ext; i++) {
        if (m->ext[i].p) munmap(m->ext[i].p, m->ext[i].n);
        free(m->ext[i].location);
    }
    free(m->ext);
    m->ext = NULL;
    m->n_ext = 0;
}

int ea_tensor_numel(const onnx_tensor *t, uint64_t *numel, ea_err *err) {
    uint64_t n = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->dims[i] < 0 || t->dims[i] > (int64_t)1 << 40)
            return ea_fail(err, "initializer '%s': dimension %d is %lld (out of range)", t->name, i,
                           (long long)t->dims[i]);
        if (t->dims[i] && n > ((uint64_t)1 << 48) / (uint64_t)t->dims[i])
            return ea_fail(err, "initializer '%s': too many elements", t->name);
        n *= (uint64_t)t->dims[i];
    }
    *numel = n;
    return 0;
}

/* MatMulNBits scales and zero points are 1-D too, but the SIMD kernels repack them at load.
 * Their names, sorted once: a lookup per vector initializer was a scan of every node's
 * inputs, initializers x nodes string compares for a file (untrusted) with many of both. */
static int cmp_name(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int is_matmulnbits(const onnx_node *nd) {
    return !strcmp(nd->op_type, "MatMulNBits") && !strcmp(nd->domain, "com.microsoft");
}

/* A node the planner folds into a MatMulNBits parameter: Cast of fp16 scales, Div of fp16 minimums
 * by them (float zero points). */
static int is_param_op(const onnx_node *nd) {
    return !*nd->domain && (!strcmp(nd->op_type, "Cast") || !strcmp(nd->op_type, "Div"));
}

/* ... and so are the fp16 initializers their float32 values are computed from (plan.c converts them
 * once): the inputs of the Cast and Div nodes that lead to a MatMulNBits parameter. */
static const char **matmulnbits_inputs(const onnx_model *om, size_t *n_out) {
    size_t n = 0;
    for (int i = 0; i < om->n_nodes; i++)
        if (is_matmulnbits(&om->nodes[i]) || is_param_op(&om->nodes[i])) n += (size_t)om->nodes[i].n_inputs;
    const char **names = malloc(sizeof *names * (n ? n : 1));
    char *taken = calloc((size_t)om->n_nodes + 1, 1);
    if (!names || !taken) {
        free(names);
        free(taken);
        return NULL;
    }
    n = 0;
    for (int i = 0; i < om->n_nodes; i++)
        if (is_matmulnbits(&om->nodes[i]))
            for (int k = 1; k < om->nodes[i].n_inputs; k++) names[n++] = om->nodes[i].inputs[k];
    qsort(names, n, sizeof *names, cmp_name);
    for (int pass = 0; pass < 2; pass++) { /* Div, then the Casts feeding it */
        const size_t before = n;
        for (int i = 0; i < om->n_nodes; i++) {
            const onnx_node *c = &om->nodes[i];
            if (taken[i] || !is_param_op(c) || c->n_outputs < 1 ||
                !bsearch(&c->outputs[0], names, before, sizeof *names, cmp_name))
                continue;
            taken[i] = 1;
            for (int k = 0; k < c->n_inputs; k++) names[n++] = c->inputs[k];
        }
        qsort(names, n, sizeof *names, cmp_name);
    }
    free(taken);
    *n_out = n;
    return names;
}

static int resolve_each(ea_model *m, const char *dir, const char **mm, size_t n_mm, ea_err *err);

int ea_resolve_tensors(ea_model *m, const char *dir, ea_err *err) {
    size_t n_mm = 0;
    const char **mm = matmulnbits_inputs(&m->onnx, &n_mm);
    if (!mm) return ea_fail(err, "%s", "out of memory indexing MatMulNBits inputs");
    const int rc = resolve_each(m, dir, mm, n_mm, err);
    free(mm);
    return rc;
}

static int resolve_each(ea_model *m, const char *dir, const char **mm, size_t n_mm, ea_err *err) {
    for (int i = 0; i < m->onnx.n_inits; i++) {
        onnx_tensor *t = &m->onnx.inits[i];
        size_t es = onnx_dtype_size(t->dtype);
        if (!es)
            return ea_fail(err, "initializer '%s': data type %d (%s) is not supported by the native runtime", t->name,
                           t->dtype, onnx_dtype_name(t->dtype));
        uint64_t numel;
        if (ea_tensor_numel(t, &numel, err)) return -1;
        uint64_t want = numel * es;
        if (t->external) {
            if (!t->location) return ea_fail(err, "initializer '%s': external data without a location", t->name);
            struct ext_map *x;
            if (open_external(m, dir, t, &x, err)) return -1;
            uint64_t off = t->ext_offset < 0 ? 0 : (uint64_t)t->ext_offset;
            uint64_t len = t->ext_length < 0 ? want : (uint64_t)t->ext_length;
            if (len != want)
                return ea_fail(err, "initializer '%s': external data length %llu does not match its dims x dtype (%llu bytes)",
                               t->name, (unsigned long long)len, (unsigned long long)want);
            if (off > x->n || len > x->n - off)
                return ea_fail(err, "initializer '%s': external data offset %llu + length %llu exceeds '%s' (%zu bytes)",
                               t->name, (unsigned long long)off, (unsigned long long)len, t->location, x->n);
            t->data = (const uint8_t *)x->p + off;
            t->nbytes = (size_t)len;
        } else {
            if (!t->has_data) {
                if (t->unsupported_field)
                    return ea_fail(err, "initializer '%s': data stored in %s is not supported (write raw_data)", t->name,
                                   t->unsupported_field);
                if (want) return ea_fail(err, "initializer '%s': no data", t->name);
            }
            if ((uint64_t)t->nbytes != want)
                return ea_fail(err, "initializer '%s': %zu data bytes but dims x dtype need %llu", t->name, t->nbytes,
                               (unsigned long long)want);
        }
        if (t->dtype == ONNX_FLOAT || t->dtype == ONNX_FLOAT16) { /* NaN/Inf weights would poison every token */
            const size_t n = (size_t)numel, chunk = ((size_t)2 << 20) / es;
            for (size_t k = 0; k < n; k++) {
                /* the scan pages the tensor in: each 2 MiB goes back as it is passed, or a float
                 * embedding table would be resident whole at the load's peak */
                if (k && k % chunk == 0) ea_release_pages(m, t->data + (k - chunk) * es, chunk * es);
                uint32_t bits;
                int bad;
                if (t->dtype == ONNX_FLOAT) {
                    memcpy(&bits, t->data + 4 * k, 4);
                    bad = (bits & 0x7f800000u) == 0x7f800000u;
                } else {
                    uint16_t h;
                    memcpy(&h, t->data + 2 * k, 2);
                    bad = (h & 0x7c00u) == 0x7c00u;
                }
                if (bad) return ea_fail(err, "initializer '%s': element %zu is NaN or infinite", t->name, k);
            }
            /* the scan paged the whole tensor in; let use (e.g. a Gather's few rows) decide what stays */
            ea_release_pages(m, t->data, (size_t)want);
        }
        /* Vectors (norm weights, biases, steering vectors) are read on every token. Read in place,
         * a fault on one maps the whole page-cache folio around it, and a large file sits in the
         * cache in 2 MiB folios mapped by one PMD entry, so the vectors between layers would make
         * the int4 data around them resident again, which only the repack is read from
         * (docs/performance.md, "vectors copied"). A private copy costs their size. */
        const int vector = t->ndim <= 1 && (t->dtype == ONNX_FLOAT || t->dtype == ONNX_FLOAT16) && want &&
                           want <= ((uint64_t)1 << 20) && in_mapping(m, t->data, (size_t)want) &&
                           !bsearch(&t->name, mm, n_mm, sizeof *mm, cmp_name);
        if (want && (vector || ((uintptr_t)t->data % es))) { /* raw_data sits anywhere in the protobuf */
            void *copy = malloc((size_t)want);
            if (!copy) return ea_fail(err, "out of memory copying initializer '%s'", t->name);
            memcpy(copy, t->data, (size_t)want);
            ea_release_pages(m, t->data, (size_t)want);
            t->owned = copy;
            t->data = copy;
            m->bytes_copied += want;
        } else {
            m->bytes_mapped += want;
        }
    }
    return 0;
}
