/* cmd_synth.c - `cparallel synth`: parses the options, writes the checkpoint
 * through cp_synth_write and shows its progress on stderr. */
#include "cmd_synth.h"

#include "cli.h"
#include "cp_synth.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

typedef struct synth_progress {
    bool tty;
    int last; /* last percentage shown */
    double t0;
} synth_progress;

static void on_progress(void *user, size_t done, size_t total) {
    synth_progress *p = user;
    int pct = total ? (int)(100.0 * (double)done / (double)total) : 100;
    double dt = cp_time_now() - p->t0;
    double rate = dt > 0 ? (double)done / dt / 1e9 : 0.0;
    if (p->tty) {
        if (pct != p->last)
            fprintf(stderr, "\rsynth: %3d%% (%.2f / %.2f GB, %.2f GB/s)", pct, done / 1e9,
                    total / 1e9, rate);
        if (pct >= 100 && p->last < 100) fputc('\n', stderr);
    } else if (pct / 10 != p->last / 10 || (pct >= 100 && p->last < 100)) {
        fprintf(stderr, "synth: %d%% (%.2f / %.2f GB, %.2f GB/s)\n", pct, done / 1e9, total / 1e9,
                rate);
    }
    p->last = pct;
}

int cp_cli_synth(int argc, char **argv) {
    const char *arch = NULL, *out = NULL, *dtype = "bf16";
    int layers = 0, threads = 0;
    uint64_t seed = 0;
    float shard_gb = 5.0f;
    bool quiet = false;
    const cli_opt opts[] = {
        {"arch", 'a', CLI_STR, &arch, 0, -1, "NAME",
         "llama3-8b, llama2-7b, llama2-70b or tiny (required)", NULL},
        {"out", 'o', CLI_STR, &out, 0, -1, "DIR",
         "output directory, created when missing (required)", NULL},
        {"layers", 'l', CLI_INT, &layers, 1, 100000, "N",
         "number of layers (default: the architecture's)", NULL},
        {"dtype", 0, CLI_STR, &dtype, 0, -1, "TYPE", "bf16, f16 or f32 (default bf16)", NULL},
        {"seed", 's', CLI_U64, &seed, 0, -1, "S", "random seed (default 0); same seed, same bytes",
         NULL},
        {"threads", 0, CLI_INT, &threads, 1, 4096, "N", "generator threads (default: all cores)",
         NULL},
        {"shard-size", 0, CLI_FLOAT, &shard_gb, 0.001, 1e6, "GB",
         "largest weight file in GB (default 5)", NULL},
        {"no-progress", 0, CLI_FLAG, &quiet, 0, -1, NULL, "do not print progress", NULL},
        {0},
    };
    const char *usage = "--arch NAME --out DIR [--layers N] [--dtype bf16|f16|f32] [--seed S]";
    int rc = cli_parse("synth", usage, opts, argc, argv, 2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!arch || !out) {
        fprintf(stderr, "cparallel synth: error: --%s is required (see 'cparallel synth --help')\n",
                !arch ? "arch" : "out");
        return 2;
    }
    cp_synth_arch a;
    if (cp_synth_preset(arch, &a) != CP_OK) {
        fprintf(stderr, "cparallel synth: error: %s\n", cp_last_error_detail());
        return 2;
    }
    cp_synth_opts o;
    cp_synth_opts_init(&o);
    if (!strcasecmp(dtype, "bf16"))
        o.dtype = CP_DTYPE_BF16;
    else if (!strcasecmp(dtype, "f16"))
        o.dtype = CP_DTYPE_F16;
    else if (!strcasecmp(dtype, "f32"))
        o.dtype = CP_DTYPE_F32;
    else {
        fprintf(
            stderr,
            "cparallel synth: error: invalid value '%s' for --dtype (expected bf16, f16 or f32)\n",
            dtype);
        return 2;
    }
    o.arch = arch;
    o.out_dir = out;
    o.n_layers = layers;
    o.seed = seed;
    o.n_threads = threads;
    o.max_shard_bytes = (uint64_t)((double)shard_gb * 1e9);
    synth_progress ps = {isatty(2), -1, cp_time_now()};
    o.progress = quiet ? NULL : on_progress;
    o.progress_user = &ps;

    uint64_t bytes = 0;
    if (cp_synth_plan(&o, &a, &bytes) != CP_OK) {
        fprintf(stderr, "cparallel synth: error: %s\n", cp_last_error_detail());
        return 2;
    }
    if (!quiet)
        fprintf(stderr, "synth: %s, %d layers, %s, %.3f GB -> %s\n", a.name, a.n_layers,
                cp_dtype_name(o.dtype), bytes / 1e9, out);
    cp_status st = cp_synth_write(&o);
    if (st != CP_OK) {
        if (!quiet && ps.tty && ps.last >= 0 && ps.last < 100) fputc('\n', stderr);
        cli_report_error("cannot write the model");
        return st == CP_ERR_INVALID_ARG ? 2 : 1;
    }
    double dt = cp_time_now() - ps.t0;
    if (!quiet)
        fprintf(stderr, "synth: wrote %s in %.1f s (%.2f GB/s)\n", out, dt,
                dt > 0 ? bytes / dt / 1e9 : 0.0);
    return 0;
}
