#ifndef EDGEACT_WEIGHTS_H
#define EDGEACT_WEIGHTS_H

#include "model.h"

/* Maps a whole file read-only (an empty file gives p = NULL, n = 0). */
int ea_map_file(const char *path, void **p, size_t *n, ea_err *err);
/* Locates every initializer's bytes (external files resolved inside dir),
 * checks them against dims x dtype, copies misaligned ones. */
int ea_resolve_tensors(ea_model *m, const char *dir, ea_err *err);
void ea_unmap_external(ea_model *m);
int ea_tensor_numel(const onnx_tensor *t, uint64_t *numel, ea_err *err);

#endif
