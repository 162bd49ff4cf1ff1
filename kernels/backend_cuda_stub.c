/* backend_cuda_stub.c - the CUDA entry points of a build without CUDA: each
 * says so, so callers can fall back to the CPU with a clear message. */
#include "cp_backend.h"

#include <string.h>

#ifndef CP_HAVE_CUDA
cp_status cp_backend_cuda_init(int device, cp_backend_t *out) {
    (void)device;
    if (out) *out = NULL;
    return CP_ERROR(CP_ERR_UNSUPPORTED, "this build of cparallel has no CUDA backend "
                                        "(configure with a CUDA toolkit present)");
}

cp_status cp_backend_cuda_device_count(int *count) {
    if (count) *count = 0;
    return CP_ERROR(CP_ERR_UNSUPPORTED, "this build of cparallel has no CUDA backend");
}

cp_status cp_backend_cuda_device_uuid(int device, uint8_t uuid[16]) {
    (void)device;
    if (uuid) memset(uuid, 0, 16);
    return CP_ERROR(CP_ERR_UNSUPPORTED, "this build of cparallel has no CUDA backend");
}
#else
typedef int cp_backend_cuda_stub_unused; /* ISO C forbids an empty translation unit */
#endif
