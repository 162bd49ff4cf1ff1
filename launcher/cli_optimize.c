/* cli_optimize.c - what the model-rewriting commands (quantize, prune)
 * share: the default texts, calibration statistics, progress, and the
 * accuracy measurement of the written model against the original. */
#include "cli_optimize.h"

#include "cli.h"
#include "cp_comm.h"
#include "cp_eval.h"
#include "cp_runtime.h"
#include "cp_tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A chapter of the Python tutorial from Debian's python3-doc (English prose
 * nobody on this project wrote), or NULL when it is not installed. The
 * evaluation text is four other chapters (cli_eval_text_pick); calibration
 * runs on "controlflow", so that the evaluation is not on the text the
 * scales or scores fit. */
const char *cli_tutorial_chapter(const char *chapter, char *path, size_t cap) {
    static const char *const versions[] = {"python3.11", "python3.12", "python3.13", "python3"};
    if (!path || cap == 0) return NULL;
    for (size_t i = 0; i < sizeof(versions) / sizeof(versions[0]); i++) {
        snprintf(path, cap, "/usr/share/doc/%s/html/_sources/tutorial/%s.rst.txt", versions[i], chapter);
        if (access(path, R_OK) == 0) return path;
    }
    return NULL;
}

int cli_eval_text_pick(const char *cmd, bool no_eval, const char *file, cli_eval_text *out) {
    static const char *const chapters[CLI_EVAL_CHAPTERS] = {"appetite", "interpreter", "introduction",
                                                            "datastructures"};
    memset(out, 0, sizeof(*out));
    if (no_eval) return 0;
    if (file) {
        out->paths[out->n++] = file;
        return 0;
    }
    for (int i = 0; i < CLI_EVAL_CHAPTERS; i++)
        if (cli_tutorial_chapter(chapters[i], out->bufs[out->n], sizeof(out->bufs[0])))
            out->paths[out->n] = out->bufs[out->n], out->n++;
    if (out->n == 0) {
        fprintf(stderr, "cparallel %s: error: no evaluation text: give --eval-text FILE (or install "
                        "python3-doc, or skip the check with --no-eval)\n", cmd);
        return 2;
    }
    return 0;
}

/* The files of t joined by newlines into *out (*len bytes), as cli_read_file. */
static bool read_eval_text(const char *cmd, const cli_eval_text *t, char **out, size_t *len) {
    *out = NULL;
    *len = 0;
    for (int i = 0; i < t->n; i++) {
        char *body = NULL;
        size_t n = 0;
        if (!cli_read_file(cmd, "evaluation text", t->paths[i], 256, &body, &n)) {
            free(*out);
            *out = NULL;
            return false;
        }
        char *joined = realloc(*out, *len + n + 2);
        if (!joined) {
            free(body);
            free(*out);
            *out = NULL;
            fprintf(stderr, "cparallel %s: error: out of memory for the evaluation text\n", cmd);
            return false;
        }
        *out = joined;
        if (i > 0) (*out)[(*len)++] = '\n';
        memcpy(*out + *len, body, n);
        *len += n;
        (*out)[*len] = '\0';
        free(body);
    }
    return true;
}

/* "FILE", or the files' names and the directory of the first. */
static void describe_eval_text(const cli_eval_text *t) {
    if (t->n == 1) {
        printf("%s", t->paths[0]);
        return;
    }
    for (int i = 0; i < t->n; i++) {
        const char *base = strrchr(t->paths[i], '/');
        printf("%s%s", i ? ", " : "", base ? base + 1 : t->paths[i]);
    }
    const char *slash = strrchr(t->paths[0], '/');
    if (slash) printf(" in %.*s", (int)(slash - t->paths[0]), t->paths[0]);
}

void cli_job_defaults(cli_job *j) {
    memset(j, 0, sizeof(*j));
    cli_par_defaults(&j->par);
    j->timeout_s = 60;
    j->device = "cpu";
    j->dev = CP_DEVICE_CPU;
    j->device_id = -1;
}

int cli_job_check(const char *cmd, cli_job *j) {
    int rc = cli_par_check(cmd, &j->par);
    if (rc) return rc;
    if (!cli_parse_device(j->device, &j->dev, &j->device_id)) {
        fprintf(stderr, "cparallel %s: error: invalid value '%s' for --device (expected cpu, cuda or cuda:N)\n", cmd,
                j->device);
        return 2;
    }
    return 0;
}

int cli_job_start(cli_job *j) {
    int rc = ranks_init(&j->rk, j->par.tp, j->par.pp, j->par.cp, j->timeout_s * 1000);
    if (rc) {
        ranks_free(&j->rk);
        return rc;
    }
    j->lead = j->rk.rank == 0;
    if (ranks_node_defaults(&j->rk, j->dev, j->par.comm, &j->threads, &j->device_id)) {
        ranks_free(&j->rk);
        return 1;
    }
    return 0;
}

int cli_job_end(cli_job *j, int rc, bool shared) {
    if (rc && !shared && j->rk.size > 1) cp_comm_abort(j->rk.world, rc);
    ranks_free(&j->rk);
    return rc;
}

bool cli_job_partial_name(const char *cmd, cli_job *j, const char *out, char *tmp, size_t cap) {
    int64_t pid = (int64_t)getpid();
    if (j->rk.size > 1 && cp_comm_bcast(j->rk.world, &pid, 1, CP_DTYPE_I64, 0, NULL) != CP_OK) {
        cli_report_error("cannot agree on the temporary file");
        return false;
    }
    if (snprintf(tmp, cap, "%s.partial-%lld", out, (long long)pid) >= (int)cap) {
        fprintf(stderr, "cparallel %s: error: --out is too long\n", cmd);
        return false;
    }
    /* rank 0 finds out now, not after the calibration, that it cannot write there */
    int32_t ok = 1;
    if (j->lead) {
        FILE *f = fopen(tmp, "wb");
        if (!f) {
            fprintf(stderr, "cparallel %s: error: cannot write next to --out '%s': %s\n", cmd, out, strerror(errno));
            ok = 0;
        } else {
            fclose(f);
            unlink(tmp);
        }
    }
    if (j->rk.size > 1 && cp_comm_bcast(j->rk.world, &ok, 1, CP_DTYPE_I32, 0, NULL) != CP_OK) {
        cli_report_error("cannot agree on the output");
        return false;
    }
    return ok != 0;
}

/* The message rank 0 broadcasts while it writes: {state, done, total}. */
enum { BEAT_WRITING = 0, BEAT_WRITTEN = 1, BEAT_FAILED = 2 };

static bool beat(cli_job *j, int64_t state, size_t done, size_t total) {
    if (j->rk.size < 2) return true;
    int64_t msg[3] = {state, (int64_t)done, (int64_t)total};
    j->last_beat = cp_time_now();
    return cp_comm_bcast(j->rk.world, msg, 3, CP_DTYPE_I64, 0, NULL) == CP_OK;
}

bool cli_job_written(cli_job *j, bool ok) {
    if (j->rk.size < 2) return ok;
    if (j->lead) {
        if (!beat(j, ok ? BEAT_WRITTEN : BEAT_FAILED, 0, 0)) {
            cli_report_error("cannot tell the other ranks the model is written");
            return false;
        }
        return ok;
    }
    for (;;) {
        int64_t msg[3] = {0, 0, 0};
        if (cp_comm_bcast(j->rk.world, msg, 3, CP_DTYPE_I64, 0, NULL) != CP_OK) {
            cli_report_error("rank 0 went silent while writing the model (raise --collective-timeout when "
                             "one tensor takes longer)");
            return false;
        }
        if (msg[0] != BEAT_WRITING) return msg[0] == BEAT_WRITTEN;
    }
}

void cli_write_progress(void *user, size_t done, size_t total) {
    cli_write_progress_state *p = user;
    if (p->job && cp_time_now() - p->job->last_beat >= 1.0) beat(p->job, BEAT_WRITING, done, total);
    if (!p->cmd) return;
    int pct = total ? (int)(100 * done / total) : 100;
    if (pct / 10 == p->last / 10) return;
    p->last = pct;
    fprintf(stderr, "cparallel: %s %3d%%\n", p->cmd, pct);
}

/* An engine of the model sharded over the job's ranks with an exact cache,
 * for the measurement on the job's device, else for calibration (on the
 * CPU, without sequence parallelism: the statistics need whole rows on the
 * host); NULL after reporting `what` failed. */
static cp_engine_t job_engine(cli_job *j, const char *model, int ctx, bool measure, const char *what) {
    cp_engine_opts eo = ranks_engine_opts(&j->rk, model, measure ? j->dev : CP_DEVICE_CPU,
                                          measure ? j->device_id : 0, j->threads, ctx, j->par.tp, j->par.pp);
    cli_par_apply(&j->par, &eo);
    if (!measure) eo.sp = false;
    eo.kv_f32 = true;
    cp_engine_t e = NULL;
    if (cp_engine_init(&eo, &e) != CP_OK) {
        cli_report_error(what);
        return NULL;
    }
    return e;
}

/* Activation statistics of the original model over calibration text. */
int cli_calibrate(const char *cmd, cli_job *j, const char *model, const char *calib, int tokens,
                  cp_act_stats **out) {
    size_t len = 0;
    char *body = NULL;
    if (!cli_read_file(cmd, "calibration text", calib, 256, &body, &len)) return 1;
    cp_engine_t e = job_engine(j, model, 512, false, "cannot load the model");
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = 1;
    if (!e) goto out;
    if (cp_tokenizer_encode(cp_engine_tokenizer(e), body, len, true, false, &ids, &n) != CP_OK) {
        cli_report_error("cannot tokenize the calibration text");
        goto out;
    }
    if (n > (size_t)tokens) n = (size_t)tokens;
    if (cp_act_stats_collect(e, ids, n, 512, out) != CP_OK) {
        cli_report_error("calibration failed");
        goto out;
    }
    if (j->lead) printf("calibration       %s: %zu tokens\n", calib, n);
    rc = 0;
out:
    free(ids);
    free(body);
    cp_engine_free(e);
    return rc;
}

/* Measures the written model against the original; 0 when it may be kept. */
int cli_measure(const char *cmd, cli_job *j, const char *orig, const char *quant, const cli_eval_text *text,
                int ctx, int max_tokens, double max_increase, bool force, double *increase) {
    size_t len = 0;
    char *body = NULL;
    if (!read_eval_text(cmd, text, &body, &len)) return 1;
    cp_engine_t r = job_engine(j, orig, ctx, true, "cannot load the original model"), m = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = 1;
    if (!r || !(m = job_engine(j, quant, ctx, true, "cannot load the new model"))) goto out;
    if (cp_tokenizer_encode(cp_engine_tokenizer(r), body, len, true, false, &ids, &n) != CP_OK) {
        cli_report_error("cannot tokenize the evaluation text");
        goto out;
    }
    const size_t n_text = n;
    if (max_tokens > 0 && n > (size_t)max_tokens) n = (size_t)max_tokens;
    cp_eval_opts o = {.ctx = ctx};
    cp_eval_result res;
    if (cp_eval_text(m, r, ids, n, &o, &res) != CP_OK) {
        cli_report_error("the evaluation failed");
        goto out;
    }
    *increase = res.ppl / res.ref_ppl - 1;
    int32_t verdict = *increase > max_increase && !force ? 3 : 0;
    if (j->lead) {
        printf("evaluation text   ");
        describe_eval_text(text);
        printf(": %zu of %zu tokens, windows of %d\n", n, n_text, res.ctx);
        char interval[96];
        printf("perplexity        original %.4f, %s %.4f (%+.2f%%, %s; bound %+.2f%%)\n", res.ref_ppl,
               !strcmp(cmd, "quantize") ? "quantized" : "pruned", res.ppl, 100 * *increase,
               cli_ppl_interval(&res, interval, sizeof(interval)), 100 * max_increase);
        if (res.ratio_hi > 0 && res.ratio_lo - 1 <= max_increase && max_increase <= res.ratio_hi - 1)
            printf("uncertain         the bound lies inside the interval: more text (--eval-text, "
                   "--eval-tokens) would settle the verdict\n");
        printf("KL(orig || new)   mean %.5f  median %.5f  p99 %.5f  max %.5f  nats/token\n", res.kl_mean,
               res.kl_p50, res.kl_p99, res.kl_max);
        printf("top-1 agreement   %.2f%%\n", 100 * res.top1);
        fflush(stdout);
    }
    /* one verdict: rank 0's */
    double v[2] = {(double)verdict, *increase};
    if (j->rk.size > 1 && cp_comm_bcast(j->rk.world, v, 2, CP_DTYPE_F64, 0, NULL) != CP_OK) {
        cli_report_error("cannot agree on the measurement");
        goto out;
    }
    rc = (int)v[0];
    *increase = v[1];
out:
    free(ids);
    free(body);
    cp_engine_free(m);
    cp_engine_free(r);
    return rc;
}

int cli_job_finish(const char *cmd, cli_job *j, const char *orig, const char *tmp, const char *out,
                   const cli_gate *gate) {
    if (gate->text && gate->text->n > 0) {
        double increase = 0;
        const int rc = cli_measure(cmd, j, orig, tmp, gate->text, gate->ctx, gate->max_tokens,
                                   gate->max_increase_pct / 100.0, gate->force, &increase);
        if (rc) {
            if (j->lead) unlink(tmp);
            if (rc == 3 && j->lead)
                fprintf(stderr, "cparallel %s: error: not written: perplexity rose by %.2f%%, more than "
                                "--max-ppl-increase %.2f%% (--force writes it anyway)\n",
                        cmd, 100 * increase, gate->max_increase_pct);
            return cli_job_end(j, 1, rc == 3);
        }
    }
    if (j->lead) {
        if (rename(tmp, out) != 0) {
            fprintf(stderr, "cparallel %s: error: cannot write '%s': %s\n", cmd, out, strerror(errno));
            unlink(tmp);
            return cli_job_end(j, 1, true);
        }
        printf("written           %s\n", out);
    }
    return cli_job_end(j, 0, true);
}
