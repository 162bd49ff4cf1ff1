/* cp_tensor.h - a view of an n-dimensional array: dtype, shape, byte strides,
 * device and data pointer. A cp_tensor owns nothing: whoever made the data
 * frees it. Dimension 0 is the innermost (contiguous) one, as in GGUF. */
#ifndef CP_TENSOR_H
#define CP_TENSOR_H

#include "cp_dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CP_MAX_DIMS 4

typedef enum cp_device { CP_DEVICE_CPU = 0, CP_DEVICE_CUDA = 1 } cp_device;

typedef struct cp_tensor {
    cp_dtype dtype;
    int ndim;
    int64_t ne[CP_MAX_DIMS]; /* elements per dimension, ne[0] innermost; unused = 1 */
    size_t nb[CP_MAX_DIMS];  /* bytes between consecutive indices (nb[0] = block bytes for quantized) */
    cp_device device;
    int device_id;
    void *data;              /* borrowed */
} cp_tensor;

/* A contiguous 2-D view: rows x cols elements, cols innermost. A weight
 * matrix of a linear layer y = W x is [out_features rows][in_features cols]. */
static inline cp_tensor cp_tensor_2d(cp_dtype t, int64_t rows, int64_t cols, void *data) {
    cp_tensor x;
    int64_t bs = cp_dtype_block_size(t);
    x.dtype = t;
    x.ndim = 2;
    x.ne[0] = cols;
    x.ne[1] = rows;
    x.ne[2] = x.ne[3] = 1;
    x.nb[0] = cp_dtype_type_size(t);
    x.nb[1] = bs ? cp_dtype_row_size(t, cols) : 0;
    x.nb[2] = x.nb[3] = x.nb[1] * (size_t)rows;
    x.device = CP_DEVICE_CPU;
    x.device_id = 0;
    x.data = data;
    return x;
}

static inline int64_t cp_tensor_nelements(const cp_tensor *x) {
    int64_t n = 1;
    for (int i = 0; i < CP_MAX_DIMS; i++) n *= x->ne[i];
    return n;
}

#ifdef __cplusplus
}
#endif

#endif /* CP_TENSOR_H */
