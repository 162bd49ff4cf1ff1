/* cp_common.c - status names, the thread-local last error, clock and aligned
 * allocation shared by every layer. */
#define _POSIX_C_SOURCE 200809L
#include "cp_common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CP_ERR_BUF 1024

static _Thread_local char err_full[CP_ERR_BUF];
static _Thread_local const char *err_detail = "";

const char *cp_status_str(cp_status st) {
    switch (st) {
    case CP_OK: return "CP_OK";
    case CP_ERR_INVALID_ARG: return "CP_ERR_INVALID_ARG";
    case CP_ERR_OOM: return "CP_ERR_OOM";
    case CP_ERR_CUDA: return "CP_ERR_CUDA";
    case CP_ERR_CUBLAS: return "CP_ERR_CUBLAS";
    case CP_ERR_NCCL: return "CP_ERR_NCCL";
    case CP_ERR_MPI: return "CP_ERR_MPI";
    case CP_ERR_IO: return "CP_ERR_IO";
    case CP_ERR_FORMAT: return "CP_ERR_FORMAT";
    case CP_ERR_UNSUPPORTED: return "CP_ERR_UNSUPPORTED";
    case CP_ERR_TIMEOUT: return "CP_ERR_TIMEOUT";
    case CP_ERR_INTERNAL: return "CP_ERR_INTERNAL";
    case CP_ERR_BUSY: return "CP_ERR_BUSY";
    }
    return "CP_ERR_UNKNOWN";
}

const char *cp_last_error(void) { return err_full; }

const char *cp_last_error_detail(void) { return err_detail ? err_detail : ""; }

cp_status cp_set_error(cp_status st, const char *file, int line, const char *fmt, ...) {
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    /* formatted aside first: the arguments may quote the previous error
     * (cp_last_error()), which lives in err_full */
    char tmp[CP_ERR_BUF];
    int n = snprintf(tmp, sizeof(tmp), "%s:%d: ", base, line);
    if (n < 0 || n >= CP_ERR_BUF) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp + n, sizeof(tmp) - (size_t)n, fmt, ap);
    va_end(ap);
    memcpy(err_full, tmp, sizeof(err_full));
    err_detail = err_full + n;
    return st;
}

void cp_clear_error(void) {
    err_full[0] = '\0';
    err_detail = "";
}

void cp_assert_fail(const char *cond, const char *file, int line) {
    fprintf(stderr, "cparallel: assertion failed at %s:%d: %s\n", file, line, cond);
    fflush(stderr);
    abort();
}

double cp_time_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

cp_status cp_aligned_alloc(void **out, size_t bytes) {
    *out = NULL;
    if (bytes == 0) bytes = 64;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes) != 0 || !p)
        return CP_ERROR(CP_ERR_OOM, "out of memory allocating %zu bytes", bytes);
    *out = p;
    return CP_OK;
}

void cp_aligned_free(void *p) { free(p); }
