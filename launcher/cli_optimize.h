/* cli_optimize.h - shared parts of `cparallel quantize` and `cparallel prune`. */
#ifndef CP_CLI_OPTIMIZE_H
#define CP_CLI_OPTIMIZE_H

#include <stdbool.h>
#include <stddef.h>

#include "cli.h"
#include "cp_quantize.h"
#include "ranks.h"

/* A chapter of the Python tutorial from Debian's python3-doc (English prose
 * nobody on this project wrote) into path[cap], or NULL when it is not
 * installed. Evaluation uses the chapters of cli_eval_text_pick;
 * calibration "controlflow". */
const char *cli_tutorial_chapter(const char *chapter, char *path, size_t cap);

/* The text the accuracy gate scores: one file, or by default the chapters
 * of the Python tutorial the quality table scores (appetite, interpreter,
 * introduction, datastructures: benchmarks/quality), those installed,
 * joined by newlines in that order. n = 0: no measurement. */
#define CLI_EVAL_CHAPTERS 4
typedef struct cli_eval_text {
    const char *paths[CLI_EVAL_CHAPTERS];
    int n;
    char bufs[CLI_EVAL_CHAPTERS][256];
} cli_eval_text;
/* file (NULL: the default chapters), or none with no_eval. 0, or 2 after
 * printing why there is no text. */
int cli_eval_text_pick(const char *cmd, bool no_eval, const char *file, cli_eval_text *out);

/* The ranks a model-rewriting command runs over (mpirun -np tp x cp x pp):
 * the calibration and the measurement shard the model over them like
 * `cparallel eval` (the parallel options of cli.h; sequence parallelism
 * and --device for the measurement only: activation statistics need whole
 * rows on the CPU); rank 0 alone reads the source and writes the result
 * (streaming, one tensor at a time) while the others wait for it, and only
 * rank 0 prints. The output must be on a file system every rank sees. */
typedef struct cli_job {
    ranks rk;
    cli_par par;
    int timeout_s, threads;
    const char *device; /* --device as given */
    cp_device dev;      /* the measurement's device, set by cli_job_check */
    int device_id;      /* -1: by node-local rank */
    bool lead;          /* rank 0 */
    double last_beat;   /* rank 0: when the waiting ranks last heard from it */
} cli_job;

/* The layout options of a cli_job j (a pointer), for an option table. */
#define CLI_JOB_OPTS(j)                                                                                      \
    CLI_PAR_OPTS(&(j)->par),                                                                                 \
    {"device", 0, CLI_STR, &(j)->device, 0, -1, "DEV",                                                       \
     "where the accuracy measurement runs: cpu (default), cuda or cuda:N (calibration, the AWQ search and "  \
     "the writing run on the CPU)", NULL},                                                                   \
    {"collective-timeout", 0, CLI_INT, &(j)->timeout_s, 0, 86400, "S",                                      \
     "deadline of every collective in seconds (default 60), also of the wait for rank 0's next tensor "      \
     "while it writes", NULL},                                                                                \
    {"threads", 0, CLI_INT, &(j)->threads, 1, 4096, "N", "CPU threads per rank (default: the node's cores "   \
     "shared by its ranks)", NULL}

/* Defaults for the options above (before parsing). */
void cli_job_defaults(cli_job *j);
/* After parsing: checks the options above (see cli_par_check, and the
 * device); 0, or 2 after printing cmd's usage error. */
int cli_job_check(const char *cmd, cli_job *j);
/* Starts the ranks; 0, or the exit code after printing why. */
int cli_job_start(cli_job *j);
/* Ends the job with exit code rc. A failure not every rank saw (shared is
 * false) aborts the other ranks, which would otherwise wait for it. */
int cli_job_end(cli_job *j, int rc, bool shared);

/* The temporary file out.partial-PID (PID of rank 0) on every rank, which
 * rank 0 checks it can create; false (after printing why) when the name
 * does not fit cap or rank 0 cannot write there. */
bool cli_job_partial_name(const char *cmd, cli_job *j, const char *out, char *tmp, size_t cap);

/* Rank 0 after writing: tells the waiting ranks whether it succeeded.
 * The others: wait for that (each heartbeat within the collective
 * deadline) and return rank 0's outcome. Collective. */
bool cli_job_written(cli_job *j, bool ok);
/* Progress of the write on rank 0: prints every 10% (user: a
 * cli_write_progress_state whose job is set) and sends the waiting ranks a
 * heartbeat at most once a second. */
typedef struct cli_write_progress_state {
    const char *cmd;
    int last;
    cli_job *job;
} cli_write_progress_state;
void cli_write_progress(void *user, size_t done, size_t total);

/* Activation statistics of model over the first `tokens` tokens of the
 * file calib, the model sharded over the job's ranks (collective: every
 * rank gets them); 0 on success (errors reported as `cparallel cmd: ...`). */
int cli_calibrate(const char *cmd, cli_job *j, const char *model, const char *calib, int tokens,
                  cp_act_stats **out);

/* Measures the model at cand against orig on the first max_tokens tokens
 * of the text (perplexity with its 95% interval, KL, top-1 agreement,
 * printed by rank 0), both sharded over the job's ranks; *increase gets the
 * relative perplexity rise. Collective; every rank returns rank 0's
 * verdict: 0 when it may be kept, 3 when the rise exceeds max_increase (a
 * fraction) and !force, 1 on errors. */
int cli_measure(const char *cmd, cli_job *j, const char *orig, const char *cand, const cli_eval_text *text,
                int ctx, int max_tokens, double max_increase, bool force, double *increase);

/* The accuracy gate of a rewritten model: evaluation text (NULL or none:
 * no measurement, nothing checked), its windows, and the bound. */
typedef struct cli_gate {
    const cli_eval_text *text;
    int ctx, max_tokens;
    double max_increase_pct;
    bool force;
} cli_gate;

/* After the model is written to tmp (on every rank, collective): measures
 * it against orig through the gate, then rank 0 renames it to out or
 * removes it, printing what happened; ends the job and returns its exit
 * code (0 written, 1 refused or failed). */
int cli_job_finish(const char *cmd, cli_job *j, const char *orig, const char *tmp, const char *out,
                   const cli_gate *gate);

#endif /* CP_CLI_OPTIMIZE_H */
