/* cp_hooks.h - operator hook scripts run on a deployment's lifecycle events
 * (`cparallel serve --hook ready=PATH --hook drain=PATH --hook fault=PATH`).
 *
 * Each hook is an executable started directly (no shell) with the event as
 * one JSON object on its standard input:
 *   {"kind":"fault","rank":0,"host":"node1","region":"eu-west","pid":123,
 *    "time":"2026-11-23T12:00:00.123Z","unix_time":1795435200.123,
 *    "in_flight":3,"message":"..."}
 * and its standard output and error going to the server's standard error.
 * A hook runs in its own process group, in the background, and is bounded
 * in time: past the timeout its whole group is killed (SIGKILL). Each kind
 * runs at most once per process (a deployment becomes ready, starts to
 * drain and fails once). The message never holds prompts or outputs. */
#ifndef CP_HOOKS_H
#define CP_HOOKS_H

#include <stdbool.h>

#include "cp_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cp_hook_kind {
    CP_HOOK_READY, /* the server answers requests */
    CP_HOOK_DRAIN, /* a stop was asked for: no new work, in-flight requests finish */
    CP_HOOK_FAULT, /* a rank, device or collective failed: the process exits non-zero */
    CP_HOOK_KINDS
} cp_hook_kind;

typedef struct cp_hooks cp_hooks;

typedef struct cp_hook_event {
    cp_hook_kind kind;
    int rank;           /* world rank of the process that runs the hook */
    const char *region; /* NULL or "": none */
    int in_flight;      /* requests in flight when it happened (-1: unknown) */
    const char *message;
} cp_hook_event;

/* A set with no hooks; each run may last timeout_ms (> 0). */
cp_status cp_hooks_create(int timeout_ms, cp_hooks **out);

/* Adds one hook from "KIND=PATH" (KIND: ready, drain or fault). Errors
 * (CP_ERR_INVALID_ARG, message naming the problem): no '=', an unknown
 * kind, a kind given twice, a PATH that is not an executable file. */
cp_status cp_hooks_add(cp_hooks *h, const char *spec);

/* True when a hook of this kind is configured. */
bool cp_hooks_has(const cp_hooks *h, cp_hook_kind kind);

/* Starts the hook of ev->kind in the background (nothing when none is set
 * or it already ran). Thread-safe; never blocks on the hook. Returns
 * CP_OK, or the error of a failed start (also logged). */
cp_status cp_hooks_fire(cp_hooks *h, const cp_hook_event *ev);

/* Waits until every started hook has ended or was killed at its timeout. */
void cp_hooks_wait(cp_hooks *h);

/* Number of hook runs started so far (any kind). */
int cp_hooks_started(const cp_hooks *h);

/* Waits for running hooks (as cp_hooks_wait), then frees. NULL: no-op. */
void cp_hooks_free(cp_hooks *h);

/* The kind's name: "ready", "drain" or "fault". */
const char *cp_hook_kind_name(cp_hook_kind kind);

#ifdef __cplusplus
}
#endif

#endif /* CP_HOOKS_H */
