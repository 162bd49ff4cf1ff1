/* cli.c - option parsing for the cparallel subcommands. */
#include "cli.h"

#include "cp_common.h"
#include "cp_eval.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void cli_print_help(const char *cmd, const char *usage, const cli_opt *opts) {
    printf("usage: cparallel %s %s\n\noptions:\n", cmd, usage);
    for (const cli_opt *o = opts; o->name; o++) {
        char left[64];
        if (o->short_name)
            snprintf(left, sizeof(left), "-%c, --%s%s%s", o->short_name, o->name, o->meta ? " " : "",
                     o->meta ? o->meta : "");
        else
            snprintf(left, sizeof(left), "    --%s%s%s", o->name, o->meta ? " " : "", o->meta ? o->meta : "");
        printf("  %-28s %s\n", left, o->help);
    }
    printf("  %-28s %s\n", "-h, --help", "show this help and exit");
}

static const cli_opt *find(const cli_opt *opts, const char *arg, const char **inline_val) {
    *inline_val = NULL;
    if (arg[0] == '-' && arg[1] == '-') {
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t n = eq ? (size_t)(eq - name) : strlen(name);
        for (const cli_opt *o = opts; o->name; o++)
            if (strlen(o->name) == n && !strncmp(o->name, name, n)) {
                if (eq) *inline_val = eq + 1;
                return o;
            }
        return NULL;
    }
    if (arg[0] == '-' && arg[1] && !arg[2])
        for (const cli_opt *o = opts; o->name; o++)
            if (o->short_name == arg[1]) return o;
    return NULL;
}

static int bad(const char *cmd, const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "cparallel %s: error: ", cmd);
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, " (see 'cparallel %s --help')\n", cmd);
    return 2;
}

int cli_parse(const char *cmd, const char *usage, const cli_opt *opts, int argc, char **argv,
              int first) {
    for (int i = first; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            cli_print_help(cmd, usage, opts);
            return 1;
        }
        const char *val;
        const cli_opt *o = find(opts, arg, &val);
        if (!o) {
            if (arg[0] == '-') return bad(cmd, "unknown option '%s'%s", arg, "");
            return bad(cmd, "unexpected argument '%s'%s", arg, "");
        }
        if (o->kind == CLI_FLAG) {
            if (val) return bad(cmd, "option '--%s' takes no value%s", o->name, "");
            *(bool *)o->dst = true;
            if (o->seen) *o->seen = true;
            continue;
        }
        if (!val) {
            if (i + 1 >= argc) return bad(cmd, "option '%s' needs a value%s", arg, "");
            val = argv[++i];
        }
        char *end = NULL;
        errno = 0;
        switch (o->kind) {
        case CLI_STR:
            *(const char **)o->dst = val;
            break;
        case CLI_LIST: {
            cli_list *l = o->dst;
            if (l->n == CLI_LIST_MAX) {
                fprintf(stderr, "cparallel %s: error: --%s is given more than %d times\n", cmd,
                        o->name, CLI_LIST_MAX);
                return 2;
            }
            l->v[l->n++] = val;
            break;
        }
        case CLI_INT: {
            long v = strtol(val, &end, 10);
            if (!*val || *end || errno || (o->min <= o->max && (v < o->min || v > o->max)))
                goto bad_value;
            *(int *)o->dst = (int)v;
            break;
        }
        case CLI_U64: {
            if (*val == '-') goto bad_value;
            unsigned long long v = strtoull(val, &end, 10);
            if (!*val || *end || errno) goto bad_value;
            *(uint64_t *)o->dst = (uint64_t)v;
            break;
        }
        case CLI_FLOAT: {
            double v = strtod(val, &end);
            if (!*val || *end || errno || !isfinite(v) || (o->min <= o->max && (v < o->min || v > o->max)))
                goto bad_value;
            *(float *)o->dst = (float)v;
            break;
        }
        default: break;
        }
        if (o->seen) *o->seen = true;
        continue;
    bad_value: {
        char range[96] = "";
        if (o->kind != CLI_STR && o->kind != CLI_LIST && o->min <= o->max)
            snprintf(range, sizeof(range), " (expected %s from %g to %g)",
                     o->kind == CLI_FLOAT ? "a number" : "an integer", o->min, o->max);
        else if (o->kind == CLI_U64)
            snprintf(range, sizeof(range), " (expected a non-negative integer)");
        fprintf(stderr, "cparallel %s: error: invalid value '%s' for --%s%s\n", cmd, val, o->name, range);
        return 2;
    }
    }
    return 0;
}

void cli_report_error(const char *what) {
    const char *d = cp_last_error_detail();
    fprintf(stderr, "cparallel: error: %s%s%s\n", what ? what : "", what && *d ? ": " : "", d);
}

bool cli_parse_device(const char *s, cp_device *dev, int *id) {
    *id = -1;
    if (!strcasecmp(s, "cpu")) {
        *dev = CP_DEVICE_CPU;
        return true;
    }
    if (strncasecmp(s, "cuda", 4) != 0) return false;
    *dev = CP_DEVICE_CUDA;
    if (s[4] == '\0') return true;
    if (s[4] != ':' || s[5] < '0' || s[5] > '9') return false;
    char *end;
    long v = strtol(s + 5, &end, 10);
    if (*end || v > 1024) return false;
    *id = (int)v;
    return true;
}

bool cli_parse_kv_type(const char *cmd, const char *s, cp_dtype *out) {
    static const struct {
        const char *name;
        cp_dtype t;
    } types[] = {{"f32", CP_DTYPE_F32}, {"f16", CP_DTYPE_F16}, {"int8", CP_DTYPE_I8_ROW}, {"fp8", CP_DTYPE_F8_ROW}};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (!strcasecmp(s, types[i].name)) {
            *out = types[i].t;
            return true;
        }
    fprintf(stderr, "cparallel %s: error: invalid value '%s' for --kv-type (expected f16, f32, int8 or fp8)\n", cmd, s);
    return false;
}

void cli_set_kv_type(cp_engine_opts *eo, cp_dtype t) {
    const bool quantized = t == CP_DTYPE_I8_ROW || t == CP_DTYPE_F8_ROW;
    if (!quantized) eo->kv_f32 = t == CP_DTYPE_F32;
    eo->kv_dtype = quantized ? t : CP_DTYPE_F32; /* not quantized: kv_f32 decides */
}

bool cli_parse_convert(const char *s, cp_dtype *out) {
    static const cp_dtype ok[] = {CP_DTYPE_F32,    CP_DTYPE_F16,    CP_DTYPE_BF16,   CP_DTYPE_Q8_0,
                                  CP_DTYPE_Q4_0,   CP_DTYPE_Q4_1,   CP_DTYPE_Q4_K,   CP_DTYPE_Q6_K,
                                  CP_DTYPE_I8_ROW, CP_DTYPE_F8_ROW, CP_DTYPE_I4_G32, CP_DTYPE_I4_G128,
                                  CP_DTYPE_S24_Q8};
    static const struct {
        const char *name;
        cp_dtype t;
    } alias[] = {{"int8", CP_DTYPE_I8_ROW}, {"fp8", CP_DTYPE_F8_ROW}, {"int4", CP_DTYPE_I4_G128},
                 {"int4-g128", CP_DTYPE_I4_G128}, {"int4-g32", CP_DTYPE_I4_G32}};
    for (size_t i = 0; i < sizeof(alias) / sizeof(alias[0]); i++)
        if (!strcasecmp(s, alias[i].name)) {
            *out = alias[i].t;
            return true;
        }
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
        if (!strcasecmp(s, cp_dtype_name(ok[i]))) {
            *out = ok[i];
            return true;
        }
    return false;
}

void cli_par_defaults(cli_par *p) {
    memset(p, 0, sizeof(*p));
    p->tp = p->pp = p->cp = 1;
    p->exchange = CP_CP_AUTO;
}

int cli_par_check(const char *cmd, cli_par *p) {
    if (p->sp && p->tp < 2) {
        fprintf(stderr, "cparallel %s: error: --sp needs --tp 2 or more\n", cmd);
        return 2;
    }
    /* the plan moves edge layers only when there are middle stages to take them */
    if (p->edge > 0 && p->pp < 3) {
        fprintf(stderr,
                "cparallel %s: error: --pp-edge-layers needs --pp 3 or more (the first and last stage give "
                "layers to the middle ones)\n",
                cmd);
        return 2;
    }
    p->exchange = CP_CP_AUTO;
    if (p->exchange_name && !cp_cp_exchange_parse(p->exchange_name, &p->exchange)) {
        fprintf(stderr, "cparallel %s: error: invalid value '%s' for --cp-exchange (expected auto, queries, kv or ring)\n",
                cmd, p->exchange_name);
        return 2;
    }
    p->comm = CP_COMM_AUTO;
    if (p->comm_name) {
        if (strcmp(p->comm_name, "nccl") == 0)
            p->comm = CP_COMM_NCCL;
        else if (strcmp(p->comm_name, "mpi") == 0)
            p->comm = CP_COMM_MPI;
        else if (strcmp(p->comm_name, "auto") != 0) {
            fprintf(stderr, "cparallel %s: error: invalid value '%s' for --comm (expected auto, nccl or mpi)\n", cmd,
                    p->comm_name);
            return 2;
        }
    }
    return 0;
}

void cli_par_apply(const cli_par *p, cp_engine_opts *eo) {
    eo->sp = p->sp;
    eo->pp_micro = p->micro;
    eo->cp_exchange = p->exchange;
    eo->edge_layer_discount = p->edge;
}

void cli_json_str(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if (*p < 0x20)
            printf("\\u%04x", *p);
        else
            putchar(*p);
    }
    putchar('"');
}

void cli_on_progress(void *user, size_t done, size_t total) {
    cli_progress *p = user;
    int pct = total ? (int)(100.0 * (double)done / (double)total) : 100;
    if (p->tty) {
        if (pct != p->last)
            fprintf(stderr, "\rloading model: %3d%% (%.1f / %.1f MB)", pct, done / 1e6,
                    total / 1e6);
        if (pct >= 100 && p->last < 100) fputc('\n', stderr);
    } else if (pct / 25 != p->last / 25 || (pct >= 100 && p->last < 100)) {
        fprintf(stderr, "loading model: %d%% (%.1f / %.1f MB)\n", pct, done / 1e6, total / 1e6);
    }
    p->last = pct;
}

bool cli_read_file(const char *cmd, const char *what, const char *path, unsigned max_mb,
                   char **out, size_t *len) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cparallel %s: error: cannot open the %s '%s': %s\n", cmd, what, path,
                strerror(errno));
        return false;
    }
    const size_t max = (size_t)max_mb << 20;
    char *buf = NULL;
    size_t cap = 0, n = 0;
    const char *why = NULL;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            size_t want = cap ? 2 * cap : 65536;
            if (want > max + 4097) want = max + 4097;
            char *nb = want > cap ? realloc(buf, want) : NULL;
            if (!nb) {
                why = "out of memory";
                break;
            }
            buf = nb;
            cap = want;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (n > max) {
            why = "too large";
            break;
        }
        if (r == 0) break;
    }
    if (!why && ferror(f)) why = "a read error";
    fclose(f);
    if (why) {
        if (!strcmp(why, "too large"))
            fprintf(stderr, "cparallel %s: error: the %s '%s' is larger than %u MB\n", cmd, what,
                    path, max_mb);
        else
            fprintf(stderr, "cparallel %s: error: cannot read the %s '%s': %s\n", cmd, what, path,
                    why);
        free(buf);
        return false;
    }
    buf[n] = '\0';
    *out = buf;
    if (len) *len = n;
    return true;
}

const char *cli_ppl_interval(const struct cp_eval_result *r, char *buf, size_t cap) {
    if (r->ratio_hi > 0)
        snprintf(buf, cap, "95%% interval %+.2f%% .. %+.2f%%", 100 * (r->ratio_lo - 1), 100 * (r->ratio_hi - 1));
    else
        snprintf(buf, cap, "too few tokens for an interval");
    return buf;
}
