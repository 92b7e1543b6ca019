/* ONNX ModelProto read from the protobuf wire format into plain structs.
 * Strings are owned copies; tensor payloads point into the caller's buffer
 * (the mmapped file) and are resolved (external data, alignment) later. */
#ifndef EDGEACT_ONNX_H
#define EDGEACT_ONNX_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

#define ONNX_MAX_DIMS 8

enum {
    ONNX_FLOAT = 1, ONNX_UINT8 = 2, ONNX_INT8 = 3, ONNX_INT32 = 6, ONNX_INT64 = 7, ONNX_FLOAT16 = 10
};
enum { ATTR_FLOAT = 1, ATTR_INT = 2, ATTR_STRING = 3, ATTR_TENSOR = 4, ATTR_GRAPH = 5,
       ATTR_FLOATS = 6, ATTR_INTS = 7, ATTR_STRINGS = 8 };

typedef struct onnx_tensor {
    char *name;
    int dtype, ndim;
    int64_t dims[ONNX_MAX_DIMS];
    const uint8_t *data; /* payload (in the file map, an external map, or `owned`) */
    size_t nbytes;
    int has_data;        /* raw_data or float_data seen */
    int external;        /* data_location = EXTERNAL */
    char *location;
    int64_t ext_offset, ext_length; /* -1 when absent */
    const char *unsupported_field;  /* e.g. "int32_data": payload kept in a form we do not read */
    void *owned;
} onnx_tensor;

typedef struct onnx_attr {
    char *name;
    int type;
    int64_t i;
    float f;
    char *s;
    int n_ints;
    int64_t *ints;
    int n_floats;
    float *floats;
} onnx_attr;

typedef struct onnx_node {
    char *name, *op_type, *domain;
    int n_inputs, n_outputs, n_attrs;
    char **inputs, **outputs;
    onnx_attr *attrs;
} onnx_node;

typedef struct onnx_value_info {
    char *name;
    int elem_type; /* 0 when unknown */
    int ndim;      /* -1 when the shape is absent */
    int64_t dims[ONNX_MAX_DIMS]; /* -1 for a symbolic dimension */
} onnx_value_info;

typedef struct onnx_opset {
    char *domain;
    int64_t version;
} onnx_opset;

typedef struct onnx_model {
    int64_t ir_version;
    int n_opsets, n_nodes, n_inits, n_inputs, n_outputs, n_functions;
    int cap_opsets, cap_nodes, cap_inits, cap_inputs, cap_outputs;
    onnx_opset *opsets;
    onnx_node *nodes;
    onnx_tensor *inits;
    onnx_value_info *inputs, *outputs;
    int has_graph;
} onnx_model;

/* Parses buf[0..n) (kept alive by the caller: tensors point into it). */
int onnx_parse(const uint8_t *buf, size_t n, onnx_model *m, ea_err *err);
void onnx_free(onnx_model *m);

size_t onnx_dtype_size(int dtype); /* 0 for types the runtime does not hold */
const char *onnx_dtype_name(int dtype);
const onnx_attr *onnx_attr_find(const onnx_node *node, const char *name);

#endif
