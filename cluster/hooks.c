/* hooks.c - runs the operator's hook scripts: posix_spawn in a new process
 * group with default signal dispositions, the event as JSON on a pipe to
 * its stdin, and one watcher thread per run that reaps it or kills its
 * group at the deadline. */
#define _GNU_SOURCE
#include "cp_hooks.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define MAX_RUNS 16
#define MAX_MESSAGE 2000 /* bytes of the message passed on */

typedef struct hook_run {
    cp_hooks *h;
    cp_hook_kind kind;
    pid_t pid;
    double start;
    pthread_t thread;
    bool joinable;
} hook_run;

struct cp_hooks {
    int timeout_ms;
    char *path[CP_HOOK_KINDS];
    bool fired[CP_HOOK_KINDS];
    pthread_mutex_t mu;
    hook_run runs[MAX_RUNS];
    int n_runs;
};

static const char *const kind_names[CP_HOOK_KINDS] = {"ready", "drain", "fault"};

const char *cp_hook_kind_name(cp_hook_kind kind) {
    return kind >= 0 && kind < CP_HOOK_KINDS ? kind_names[kind] : "unknown";
}

cp_status cp_hooks_create(int timeout_ms, cp_hooks **out) {
    if (!out || timeout_ms <= 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_hooks_create: bad arguments");
    cp_hooks *h = calloc(1, sizeof(*h));
    if (!h) return CP_ERROR(CP_ERR_OOM, "out of memory");
    h->timeout_ms = timeout_ms;
    pthread_mutex_init(&h->mu, NULL);
    *out = h;
    return CP_OK;
}

cp_status cp_hooks_add(cp_hooks *h, const char *spec) {
    if (!h || !spec) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_hooks_add: NULL argument");
    const char *eq = strchr(spec, '=');
    if (!eq || eq == spec || !eq[1])
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "hook '%s' is not KIND=PATH (KIND: ready, drain or fault)", spec);
    int kind = -1;
    for (int k = 0; k < CP_HOOK_KINDS; k++)
        if ((size_t)(eq - spec) == strlen(kind_names[k]) &&
            !strncmp(spec, kind_names[k], (size_t)(eq - spec)))
            kind = k;
    if (kind < 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "unknown hook kind '%.*s' (expected ready, drain or fault)",
                        (int)(eq - spec), spec);
    if (h->path[kind])
        return CP_ERROR(CP_ERR_INVALID_ARG, "the %s hook is given twice", kind_names[kind]);
    const char *path = eq + 1;
    struct stat sb;
    if (stat(path, &sb) != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s hook '%s': %s", kind_names[kind], path,
                        strerror(errno));
    if (!S_ISREG(sb.st_mode) || access(path, X_OK) != 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "%s hook '%s' is not an executable file",
                        kind_names[kind], path);
    if (!(h->path[kind] = strdup(path))) return CP_ERROR(CP_ERR_OOM, "out of memory");
    return CP_OK;
}

bool cp_hooks_has(const cp_hooks *h, cp_hook_kind kind) {
    return h && kind >= 0 && kind < CP_HOOK_KINDS && h->path[kind];
}

int cp_hooks_started(const cp_hooks *h) {
    if (!h) return 0;
    pthread_mutex_lock((pthread_mutex_t *)&h->mu);
    int n = h->n_runs;
    pthread_mutex_unlock((pthread_mutex_t *)&h->mu);
    return n;
}

/* The event as one line of JSON (malloc'd), or NULL when out of memory. */
static char *event_json(const cp_hook_event *ev) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char iso[96], host[256] = "";
    snprintf(iso, sizeof(iso), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    gethostname(host, sizeof(host) - 1);
    char msg[MAX_MESSAGE + 1];
    snprintf(msg, sizeof(msg), "%s", ev->message ? ev->message : "");
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "kind", json_string(cp_hook_kind_name(ev->kind)));
    json_object_set_new(o, "rank", json_integer(ev->rank));
    json_object_set_new(o, "host", json_string(host));
    json_object_set_new(o, "region",
                        ev->region && *ev->region ? json_string(ev->region) : json_null());
    json_object_set_new(o, "pid", json_integer((json_int_t)getpid()));
    json_object_set_new(o, "time", json_string(iso));
    json_object_set_new(o, "unix_time", json_real((double)ts.tv_sec + ts.tv_nsec * 1e-9));
    json_object_set_new(o, "in_flight", json_integer(ev->in_flight));
    /* invalid UTF-8 in a message would make the string NULL: keep the key */
    json_t *m = json_string(msg);
    json_object_set_new(o, "message", m ? m : json_string("(message not valid UTF-8)"));
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

/* Watches one run: reaps it, or kills its process group at the deadline. */
static void *watch(void *arg) {
    hook_run *r = arg;
    const cp_hooks *h = r->h;
    const char *name = kind_names[r->kind];
    double deadline = r->start + h->timeout_ms * 1e-3;
    int status = 0;
    bool killed = false;
    for (;;) {
        pid_t w = waitpid(r->pid, &status, WNOHANG);
        if (w == r->pid) break;
        if (w < 0 && errno != EINTR) {
            status = -1;
            break;
        }
        if (!killed && cp_time_now() >= deadline) {
            kill(-r->pid, SIGKILL);
            killed = true;
        }
        usleep(20000);
    }
    double took = cp_time_now() - r->start;
    if (killed)
        fprintf(stderr, "cparallel: %s hook '%s' killed after %.1f s (hook timeout %d ms)\n", name,
                h->path[r->kind], took, h->timeout_ms);
    else if (status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
        fprintf(stderr, "cparallel: %s hook '%s' done in %.2f s\n", name, h->path[r->kind], took);
    else if (status >= 0 && WIFEXITED(status))
        fprintf(stderr, "cparallel: warning: %s hook '%s' exited with status %d after %.2f s\n",
                name, h->path[r->kind], WEXITSTATUS(status), took);
    else if (status >= 0 && WIFSIGNALED(status))
        fprintf(stderr, "cparallel: warning: %s hook '%s' ended by signal %d after %.2f s\n", name,
                h->path[r->kind], WTERMSIG(status), took);
    else
        fprintf(stderr, "cparallel: warning: %s hook '%s': lost track of it (%s)\n", name,
                h->path[r->kind], strerror(errno));
    return NULL;
}

cp_status cp_hooks_fire(cp_hooks *h, const cp_hook_event *ev) {
    if (!h || !ev || ev->kind < 0 || ev->kind >= CP_HOOK_KINDS) return CP_OK;
    pthread_mutex_lock(&h->mu);
    const char *path = h->path[ev->kind];
    if (!path || h->fired[ev->kind] || h->n_runs == MAX_RUNS) {
        pthread_mutex_unlock(&h->mu);
        return CP_OK;
    }
    h->fired[ev->kind] = true;
    const char *name = kind_names[ev->kind];
    cp_status st = CP_OK;
    char *json = event_json(ev);
    int fd[2] = {-1, -1};
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    bool fa_ok = false, at_ok = false;
    if (!json) {
        st = CP_ERROR(CP_ERR_OOM, "%s hook: out of memory", name);
        goto out;
    }
    if (pipe2(fd, O_CLOEXEC) != 0) {
        st = CP_ERROR(CP_ERR_IO, "%s hook: cannot make a pipe: %s", name, strerror(errno));
        goto out;
    }
    fa_ok = posix_spawn_file_actions_init(&fa) == 0;
    at_ok = posix_spawnattr_init(&at) == 0;
    if (!fa_ok || !at_ok) {
        st = CP_ERROR(CP_ERR_OOM, "%s hook: out of memory", name);
        goto out;
    }
    posix_spawn_file_actions_adddup2(&fa, fd[0], 0);
    /* its own group (killed as one at the deadline), no signal the server
     * ignores or blocks carried over (followers ignore SIGTERM) */
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK |
                                      POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setpgroup(&at, 0);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &all);
    char *argv[] = {(char *)path, NULL};
    hook_run *r = &h->runs[h->n_runs];
    r->h = h;
    r->kind = ev->kind;
    r->start = cp_time_now();
    int rc = posix_spawn(&r->pid, path, &fa, &at, argv, environ);
    if (rc != 0) {
        st = CP_ERROR(CP_ERR_IO, "%s hook '%s' could not start: %s", name, path, strerror(rc));
        goto out;
    }
    close(fd[0]);
    fd[0] = -1;
    /* the event is small (well under a pipe's buffer): this write does not
     * wait for the hook; a hook that exits unread makes it fail with
     * EPIPE and raise SIGPIPE, blocked (and then discarded) on this thread */
    sigset_t pipe_set, old;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    size_t len = strlen(json), off = 0;
    while (off < len + 1) {
        ssize_t w = write(fd[1], off < len ? json + off : "\n", off < len ? len - off : 1);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (size_t)w;
    }
    close(fd[1]);
    fd[1] = -1;
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, NULL, &zero) > 0) {
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    r->joinable = pthread_create(&r->thread, NULL, watch, r) == 0;
    if (!r->joinable) watch(r); /* no watcher thread: wait here, within the deadline */
    h->n_runs++;
    fprintf(stderr, "cparallel: %s hook '%s' started (pid %d)\n", name, path, (int)r->pid);
out:
    if (st != CP_OK) fprintf(stderr, "cparallel: warning: %s\n", cp_last_error_detail());
    if (fd[0] >= 0) close(fd[0]);
    if (fd[1] >= 0) close(fd[1]);
    if (fa_ok) posix_spawn_file_actions_destroy(&fa);
    if (at_ok) posix_spawnattr_destroy(&at);
    free(json);
    pthread_mutex_unlock(&h->mu);
    return st;
}

void cp_hooks_wait(cp_hooks *h) {
    if (!h) return;
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n_runs; i++) {
        if (!h->runs[i].joinable) continue;
        pthread_join(h->runs[i].thread, NULL);
        h->runs[i].joinable = false;
    }
    pthread_mutex_unlock(&h->mu);
}

void cp_hooks_free(cp_hooks *h) {
    if (!h) return;
    cp_hooks_wait(h);
    for (int k = 0; k < CP_HOOK_KINDS; k++)
        free(h->path[k]);
    pthread_mutex_destroy(&h->mu);
    free(h);
}
