/* cli.h - table-driven option parsing shared by the subcommands: long and
 * short options, typed values with range checks, and --help text generated
 * from the same table, so an unknown option or a bad value is always one
 * clear line and exit code 2. */
#ifndef CP_CLI_H
#define CP_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cp_comm.h"
#include "cp_runtime.h"
#include "cp_tensor.h"

typedef enum cli_kind { CLI_FLAG, CLI_STR, CLI_INT, CLI_FLOAT, CLI_U64, CLI_LIST } cli_kind;

/* The values of an option that may be given several times (CLI_LIST). */
#define CLI_LIST_MAX 32
typedef struct cli_list {
    const char *v[CLI_LIST_MAX];
    int n;
} cli_list;

typedef struct cli_opt {
    const char *name;   /* long name without "--" */
    char short_name;    /* 0 for none */
    cli_kind kind;
    void *dst;          /* bool*, const char**, int*, float*, uint64_t*, cli_list* */
    double min, max;    /* inclusive range for numbers (ignored when min > max) */
    const char *meta;   /* value placeholder in help, e.g. "N" */
    const char *help;
    bool *seen;         /* optional: set when the option was given */
} cli_opt;

/* Parses argv[first..argc) against opts (terminated by a zeroed entry).
 * Returns 0 on success, 1 when --help was printed, 2 on a usage error
 * (message already printed to stderr). Positional arguments are errors. */
int cli_parse(const char *cmd, const char *usage, const cli_opt *opts, int argc, char **argv,
              int first);

void cli_print_help(const char *cmd, const char *usage, const cli_opt *opts);

/* The value of --device: "cpu", "cuda" (*id = -1: the caller picks the GPU,
 * e.g. from the node-local rank) or "cuda:N" (*id = N). False for anything
 * else. */
bool cli_parse_device(const char *s, cp_device *dev, int *id);

/* The value of --convert: a weight type the loader converts to at load. */
#define CLI_CONVERT_TYPES                                                                          \
    "f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k (GGUF types), int8 (per output channel), "     \
    "int4 = int4-g128 or int4-g32 (asymmetric groups), fp8 (E4M3 per channel, W8A8), "          \
    "s24_q8 (2:4 sparse int8: the two largest of every four weights kept)"
#define CLI_CONVERT_HELP "convert weights at load to " CLI_CONVERT_TYPES
bool cli_parse_convert(const char *s, cp_dtype *out);

/* --kv-type: f32, f16, int8 (a row of int8 codes and a scale per position
 * and KV head) or fp8 (E4M3 codes and a scale), the quantized ones on the
 * CPU backend. cli_parse_kv_type gives F32, F16, I8_ROW or F8_ROW, or is
 * false after printing cmd's usage error; cli_set_kv_type puts the type
 * into the engine options. */
#define CLI_KV_TYPE_HELP                                                                           \
    "KV cache type: f16, f32, int8 or fp8 (a scale per position and KV head; CPU backend)"
bool cli_parse_kv_type(const char *cmd, const char *s, cp_dtype *out);
void cli_set_kv_type(cp_engine_opts *eo, cp_dtype t);

/* ---- the parallel layout -------------------------------------------------
 * The options of every command that runs a model across ranks, defined
 * once so that each takes them alike: the layout (CLI_LAYOUT_OPTS: also
 * inspect's) and how the ranks work together (CLI_RUN_PAR_OPTS). */
typedef struct cli_par {
    int tp, pp, cp;            /* the job needs tp x cp x pp ranks */
    int edge;                  /* --pp-edge-layers (cp_engine_opts.edge_layer_discount) */
    int micro;                 /* --micro-batches (0: the runtime's 4 x pp) */
    bool sp;
    const char *exchange_name; /* --cp-exchange as given (NULL: auto) */
    int exchange;              /* CP_CP_*, set by cli_par_check */
    const char *comm_name;     /* --comm as given (NULL: auto) */
    cp_comm_kind comm;         /* CP_COMM_AUTO, _MPI or _NCCL, set by cli_par_check */
} cli_par;

/* tp = pp = cp = 1, everything else off. */
void cli_par_defaults(cli_par *p);

#define CLI_LAYOUT_OPTS(p)                                                                                     \
    {"tp", 0, CLI_INT, &(p)->tp, 1, 1024, "N", "tensor-parallel ranks per pipeline stage (default 1)", NULL},   \
    {"pp", 0, CLI_INT, &(p)->pp, 1, 1024, "N", "pipeline stages (default 1); a job runs tp x cp x pp ranks", \
     NULL},                                                                                                    \
    {"cp", 0, CLI_INT, &(p)->cp, 1, 1024, "N",                                                                 \
     "context-parallel ranks: each computes every N-th position and keeps its KV cache (CPU; default 1)",     \
     NULL},                                                                                                    \
    {"pp-edge-layers", 0, CLI_INT, &(p)->edge, 0, 1 << 20, "N",                                                \
     "with --pp 3 or more: N layers fewer on the first and on the last stage, which also hold the "          \
     "embedding and the LM head, given to the middle stages (default 0: an even split)", NULL}

#define CLI_RUN_PAR_OPTS(p)                                                                                    \
    {"sp", 0, CLI_FLAG, &(p)->sp, 0, -1, NULL,                                                                 \
     "sequence parallelism for prompts inside the TP group (needs --tp > 1)", NULL},                          \
    {"micro-batches", 0, CLI_INT, &(p)->micro, 1, 4096, "N",                                                   \
     "cut each batch into N micro-batches so pipeline stages overlap (default 4 x --pp)", NULL},             \
    {"cp-exchange", 0, CLI_STR, &(p)->exchange_name, 0, -1, "HOW",                                             \
     "what the cp ranks pass in attention: auto (default: the smaller per sequence, K/V for a fresh "        \
     "prompt, queries for decode; K/V of long histories around the ring), queries, kv (all-gathered) or "   \
     "ring (K/V passed around the ring)", NULL},                                                              \
    {"comm", 0, CLI_STR, &(p)->comm_name, 0, -1, "HOW",                                                        \
     "how ranks on GPUs pass activations: auto (default: NCCL when every rank has a GPU of its own, else "   \
     "MPI through host memory), nccl (an error when it cannot start) or mpi", NULL}

#define CLI_PAR_OPTS(p) CLI_LAYOUT_OPTS(p), CLI_RUN_PAR_OPTS(p)

/* Checks what the table cannot (--sp needs --tp 2 or more, --pp-edge-layers
 * --pp 3 or more, --cp-exchange and --comm known names) and sets
 * p->exchange and p->comm. 0, or 2
 * after printing cmd's usage error. */
int cli_par_check(const char *cmd, cli_par *p);

/* The options into the engine's (sp, micro-batches, exchange, edge layers;
 * tp, pp and cp come with ranks_engine_opts). */
void cli_par_apply(const cli_par *p, cp_engine_opts *eo);

/* "95% interval +a% .. +b%" of an evaluation's perplexity ratio against
 * its reference (cp_eval.h), or "too few tokens for an interval", into
 * buf[cap]; returns buf. */
struct cp_eval_result;
const char *cli_ppl_interval(const struct cp_eval_result *r, char *buf, size_t cap);

/* Prints s to stdout as a JSON string literal (quotes, backslashes and
 * control characters escaped: paths may hold them). */
void cli_json_str(const char *s);

/* Model-load progress on stderr for cp_engine_opts.progress: a line
 * rewritten in place on a terminal, else a line per quarter. */
typedef struct cli_progress {
    bool tty;
    int last; /* -1 before the first call */
} cli_progress;
void cli_on_progress(void *user, size_t done, size_t total);

/* Reads a whole file (NUL-terminated, *len bytes without it) of at most
 * max_mb megabytes into *out (malloc'd). On failure prints one line naming
 * the file as "the WHAT" ("cparallel CMD: error: cannot open the text
 * 'x'") and returns false. */
bool cli_read_file(const char *cmd, const char *what, const char *path, unsigned max_mb,
                   char **out, size_t *len);

/* Prints "cparallel: error: <detail of the last runtime error>" to stderr. */
void cli_report_error(const char *what);

#endif /* CP_CLI_H */
