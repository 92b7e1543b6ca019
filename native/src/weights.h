#ifndef EDGEACT_WEIGHTS_H
#define EDGEACT_WEIGHTS_H

#include "model.h"

/* Maps a whole file read-only (an empty file gives p = NULL, n = 0). */
int ea_map_file(const char *path, void **p, size_t *n, ea_err *err);
/* Locates every initializer's bytes (external files resolved inside dir),
 * checks them against dims x dtype, copies misaligned ones. */
int ea_resolve_tensors(ea_model *m, const char *dir, ea_err *err);
void ea_unmap_external(ea_model *m);
/* Gives back the resident pages of mapped bytes the runtime no longer reads
 * (repacked or copied elsewhere); a no-op for heap memory. */
void ea_release_pages(const ea_model *m, const void *p, size_t n);
int ea_tensor_numel(const onnx_tensor *t, uint64_t *numel, ea_err *err);

#endif
