/* cp_common.h - status codes, the thread-local last error and the checking
 * macros every layer of cparallel uses. A fallible function returns a
 * cp_status; the words a user can act on are kept in cp_last_error(). */
#ifndef CP_COMMON_H
#define CP_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cp_status {
    CP_OK = 0,
    CP_ERR_INVALID_ARG,  /* bad input from the caller or the user */
    CP_ERR_OOM,          /* an allocation failed */
    CP_ERR_CUDA,
    CP_ERR_CUBLAS,
    CP_ERR_NCCL,
    CP_ERR_MPI,
    CP_ERR_IO,           /* a file could not be opened, read or written */
    CP_ERR_FORMAT,       /* a file was read but its contents are malformed */
    CP_ERR_UNSUPPORTED,  /* valid input that this build cannot handle */
    CP_ERR_TIMEOUT,      /* a deadline passed */
    CP_ERR_INTERNAL,
    CP_ERR_BUSY,         /* a queue or pool is full now; the same call may succeed later */
} cp_status;

/* The code's name, e.g. "CP_ERR_FORMAT". Never NULL. */
const char *cp_status_str(cp_status st);

/* The last error recorded on this thread, "file:line: detail", or "" when
 * none. The pointer stays valid until the next error on this thread. */
const char *cp_last_error(void);

/* Only the detail part of the last error (what a user is shown). */
const char *cp_last_error_detail(void);

/* Records an error on this thread and returns st, so that callers can write
 * `return CP_ERROR(CP_ERR_IO, "cannot open %s", path);`. */
cp_status cp_set_error(cp_status st, const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Forgets the last error on this thread. */
void cp_clear_error(void);

#define CP_ERROR(st, ...) cp_set_error((st), __FILE__, __LINE__, __VA_ARGS__)

#define CP_CHECK(expr)                                                                             \
    do {                                                                                           \
        cp_status cp_check_st_ = (expr);                                                           \
        if (cp_check_st_ != CP_OK) return cp_check_st_;                                            \
    } while (0)

#define CP_CHECK_GOTO(expr, st, label)                                                             \
    do {                                                                                           \
        (st) = (expr);                                                                             \
        if ((st) != CP_OK) goto label;                                                             \
    } while (0)

/* Broken invariants only, never bad input. */
void cp_assert_fail(const char *cond, const char *file, int line);
#define CP_ASSERT(cond)                                                                            \
    do {                                                                                           \
        if (!(cond)) cp_assert_fail(#cond, __FILE__, __LINE__);                                    \
    } while (0)

/* Monotonic clock in seconds. */
double cp_time_now(void);

/* Allocation helpers that record CP_ERR_OOM with the requested size. Memory
 * from cp_aligned_alloc is 64-byte aligned and released with cp_aligned_free. */
cp_status cp_aligned_alloc(void **out, size_t bytes);
void cp_aligned_free(void *p);

#ifdef __cplusplus
}
#endif

#endif /* CP_COMMON_H */
