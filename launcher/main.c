/* main.c - the cparallel command line: parses the subcommand and its
 * options, builds the engine through the runtime API, and turns statuses
 * into exit codes (0 ok, 1 runtime error, 2 usage error). */
#include "cli.h"
#include "cmd_distill.h"
#include "cmd_eval.h"
#include "cmd_prune.h"
#include "cmd_quantize.h"
#include "cmd_route.h"
#include "cmd_serve.h"
#include "cmd_synth.h"
#include "ranks.h"
#include "cp_comm.h"
#include "cp_gguf.h"
#include "cp_plan.h"
#include "cp_runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static const char *VERSION = "0.1.0";


/* A weight type by its GGUF name, any case. */
/* ---- generate ----------------------------------------------------------- */

static bool print_token(void *user, int32_t token, const char *piece, size_t len) {
    (void)user;
    (void)token;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return true;
}

static int cmd_generate(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *prompt_file = NULL, *system = NULL, *convert = NULL, *kv_type = NULL;
    bool chat = false, ignore_eos = false, kv_f32 = false, no_progress = false, seed_seen = false;
    bool template_system = false;
    const char *device = "cpu";
    int n = 256, threads = 0, ctx = 0, top_k = 40, timeout_s = 60;
    cli_par par;
    cli_par_defaults(&par);
    float temperature = 0.8f, top_p = 0.95f, min_p = 0.05f;
    uint64_t seed = 0;
    const cli_opt opts[] = {
        {"model", 'm', CLI_STR, &model, 0, -1, "PATH", "GGUF file or Hugging Face model directory (required)", NULL},
        {"prompt", 'p', CLI_STR, &prompt, 0, -1, "TEXT", "prompt text", NULL},
        {"prompt-file", 'f', CLI_STR, &prompt_file, 0, -1, "FILE", "read the prompt from FILE", NULL},
        {"chat", 0, CLI_FLAG, &chat, 0, -1, NULL, "wrap the prompt as a user message in the model's chat template", NULL},
        {"system", 0, CLI_STR, &system, 0, -1, "TEXT", "system message for --chat", NULL},
        {"template-system", 0, CLI_FLAG, &template_system, 0, -1, NULL,
         "with --chat and no --system, insert the default system message the template contains", NULL},
        {"n-predict", 'n', CLI_INT, &n, 0, 1 << 20, "N", "tokens to generate (default 256; 0 = until end or context full)", NULL},
        {"temperature", 't', CLI_FLOAT, &temperature, 0, 100, "T", "sampling temperature, 0 = greedy (default 0.8)", NULL},
        {"top-k", 0, CLI_INT, &top_k, 0, 1 << 24, "K", "keep the K most likely tokens, 0 = off (default 40)", NULL},
        {"top-p", 0, CLI_FLOAT, &top_p, 0, 1, "P", "nucleus sampling mass, 1 = off (default 0.95)", NULL},
        {"min-p", 0, CLI_FLOAT, &min_p, 0, 1, "P", "drop tokens below P x the top probability, 0 = off (default 0.05)", NULL},
        {"seed", 's', CLI_U64, &seed, 0, -1, "S", "random seed (default: from the system)", &seed_seen},
        {"threads", 0, CLI_INT, &threads, 1, 4096, "N", "CPU threads per rank (default: the node's cores / its ranks)", NULL},
        {"device", 0, CLI_STR, &device, 0, -1, "DEV",
         "cpu (default), cuda (one GPU per rank: node-local rank modulo the GPUs) or cuda:N", NULL},
        {"ctx-size", 'c', CLI_INT, &ctx, 1, 1 << 24, "N", "context length in tokens (default: min(model's, 4096))", NULL},
        {"ignore-eos", 0, CLI_FLAG, &ignore_eos, 0, -1, NULL, "keep generating past end-of-text tokens (benchmarks)", NULL},
        {"kv-f32", 0, CLI_FLAG, &kv_f32, 0, -1, NULL, "keep the KV cache in fp32 instead of fp16", NULL},
        {"kv-type", 0, CLI_STR, &kv_type, 0, -1, "TYPE", CLI_KV_TYPE_HELP, NULL},
        {"convert", 0, CLI_STR, &convert, 0, -1, "TYPE", CLI_CONVERT_HELP, NULL},
        {"no-progress", 0, CLI_FLAG, &no_progress, 0, -1, NULL, "do not print load progress", NULL},
        CLI_PAR_OPTS(&par),
        {"collective-timeout", 0, CLI_INT, &timeout_s, 0, 86400, "S",
         "seconds before a collective that a rank misses fails (default 60, 0 = never)", NULL},
        {0},
    };
    const char *usage = "--model PATH (--prompt TEXT | --prompt-file FILE) [options]";
    int rc = cli_parse("generate", usage, opts, argc, argv, 2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!model) {
        fprintf(stderr, "cparallel generate: error: --model is required (see 'cparallel generate --help')\n");
        return 2;
    }
    if (!prompt == !prompt_file) {
        fprintf(stderr, "cparallel generate: error: give exactly one of --prompt and --prompt-file\n");
        return 2;
    }
    if ((rc = cli_par_check("generate", &par))) return rc;
    if ((system || template_system) && !chat) {
        fprintf(stderr, "cparallel generate: error: --%s needs --chat\n", system ? "system" : "template-system");
        return 2;
    }
    int device_id = -1;
    cp_device dev;
    if (!cli_parse_device(device, &dev, &device_id)) {
        fprintf(stderr, "cparallel generate: error: invalid value '%s' for --device (expected cpu, cuda or cuda:N)\n", device);
        return 2;
    }
    cp_dtype convert_dtype = CP_DTYPE_F32;
    if (convert && !cli_parse_convert(convert, &convert_dtype)) {
        fprintf(stderr, "cparallel generate: error: invalid value '%s' for --convert (expected " CLI_CONVERT_TYPES ")\n", convert);
        return 2;
    }
    cp_dtype kv_dtype = CP_DTYPE_F32;
    if (kv_type && !cli_parse_kv_type("generate", kv_type, &kv_dtype)) return 2;
    char *file_text = NULL;
    if (prompt_file) {
        if (!cli_read_file("generate", "prompt file", prompt_file, 64, &file_text, NULL)) return 1;
        prompt = file_text;
    }
    ranks rk;
    rc = ranks_init(&rk, par.tp, par.pp, par.cp, timeout_s * 1000);
    if (rc) {
        ranks_free(&rk);
        free(file_text);
        return rc;
    }
    const bool lead = rk.rank == 0; /* only rank 0 prints */
    if (!seed_seen) {
        FILE *r = fopen("/dev/urandom", "rb");
        if (!r || fread(&seed, sizeof(seed), 1, r) != 1) seed = (uint64_t)(cp_time_now() * 1e9);
        if (r) fclose(r);
    }
    /* every rank samples with rank 0's seed */
    if (rk.size > 1 && cp_comm_bcast(rk.world, &seed, 1, CP_DTYPE_I64, 0, NULL) != CP_OK) {
        cli_report_error("cannot share the seed");
        ranks_free(&rk);
        free(file_text);
        return 1;
    }

    if (ranks_node_defaults(&rk, dev, par.comm, &threads, &device_id)) {
        ranks_free(&rk);
        free(file_text);
        return 1;
    }
    cli_progress ps = {isatty(2), -1};
    cp_engine_opts eo = ranks_engine_opts(&rk, model, dev, device_id, threads, ctx, par.tp, par.pp);
    cli_par_apply(&par, &eo);
    eo.kv_f32 = kv_f32;
    if (kv_type) cli_set_kv_type(&eo, kv_dtype);
    eo.convert_weights = convert != NULL;
    eo.weight_dtype = convert_dtype;
    eo.progress = no_progress || !lead ? NULL : cli_on_progress;
    eo.progress_user = &ps;
    cp_engine_t e = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    rc = 1;
    if (cp_engine_init(&eo, &e) != CP_OK) {
        cli_report_error("cannot load the model");
        goto out;
    }
    cp_tokenizer_t tok = cp_engine_tokenizer(e);
    if (chat) {
        cp_chat_msg msgs[2];
        size_t nm = 0;
        if (system) msgs[nm++] = (cp_chat_msg){"system", system};
        msgs[nm++] = (cp_chat_msg){"user", prompt};
        unsigned flags = CP_CHAT_GENERATION_PROMPT | (template_system ? CP_CHAT_TEMPLATE_SYSTEM : 0u);
        /* control tokens come from the template's markup, never from the prompt */
        if (cp_tokenizer_encode_chat(tok, msgs, nm, flags, &ids, &n_ids, NULL) != CP_OK) {
            cli_report_error("cannot apply the chat template to the prompt");
            goto out;
        }
    } else if (cp_tokenizer_encode(tok, prompt, strlen(prompt), true, false, &ids, &n_ids) != CP_OK) {
        cli_report_error("cannot tokenize the prompt");
        goto out;
    }
    cp_gen_params gp = {
        .sample = {.temperature = temperature, .top_k = top_k, .top_p = top_p, .min_p = min_p},
        .seed = seed,
        .max_tokens = n,
        .ignore_eos = ignore_eos,
    };
    cp_gen_stats gs;
    if (!chat && lead) fwrite(prompt, 1, strlen(prompt), stdout);
    fflush(stdout);
    if (cp_engine_generate(e, ids, (int)n_ids, &gp, lead ? print_token : NULL, NULL, &gs) != CP_OK) {
        if (lead) fputc('\n', stdout);
        cli_report_error("generation failed");
        goto out;
    }
    if (!lead) {
        rc = 0;
        goto out;
    }
    fputc('\n', stdout);
    fflush(stdout);
    int n_dec = gs.n_gen > 0 ? gs.n_gen - 1 : 0; /* the first token comes from the prefill */
    fprintf(stderr,
            "cparallel: prefill %d tokens in %.2f ms (%.2f tok/s), decode %d tokens in %.2f ms "
            "(%.2f tok/s)\n",
            gs.n_prompt, gs.prefill_s * 1e3, gs.prefill_s > 0 ? gs.n_prompt / gs.prefill_s : 0.0, n_dec,
            gs.decode_s * 1e3, gs.decode_s > 0 ? n_dec / gs.decode_s : 0.0);
    rc = 0;
out:
    free(ids);
    free(file_text);
    cp_engine_free(e);
    /* a rank that failed mid-collective would leave the others waiting:
     * end the whole job (they also fail by their deadline) */
    if (rc == 1 && rk.size > 1) cp_comm_abort(rk.world, 1);
    ranks_free(&rk);
    return rc;
}

/* ---- inspect ------------------------------------------------------------ */

static int cmd_inspect(int argc, char **argv) {
    const char *model = NULL;
    bool tensors = false;
    cli_par par; /* the layout whose shares are printed */
    cli_par_defaults(&par);
    const cli_opt opts[] = {
        {"model", 'm', CLI_STR, &model, 0, -1, "PATH", "GGUF file or Hugging Face model directory (required)", NULL},
        {"tensors", 0, CLI_FLAG, &tensors, 0, -1, NULL, "also list every tensor", NULL},
        CLI_LAYOUT_OPTS(&par),
        {0},
    };
    int rc = cli_parse("inspect",
                       "--model PATH [--tensors] [--tp N] [--cp N] [--pp N [--pp-edge-layers N]]\n"
                       "       (with a layout of more than one rank, also what each rank holds)",
                       opts, argc, argv, 2);
    if (rc) return rc == 1 ? 0 : rc;
    if (!model) {
        fprintf(stderr, "cparallel inspect: error: --model is required (see 'cparallel inspect --help')\n");
        return 2;
    }
    if ((rc = cli_par_check("inspect", &par))) return rc;
    cp_backend_t be = NULL;
    cp_model_t m = NULL;
    cp_tokenizer_t tok = NULL;
    rc = 1;
    if (cp_backend_cpu_init(1, &be) != CP_OK) {
        cli_report_error(NULL);
        goto out;
    }
    cp_model_load_opts lo = {.backend = be};
    if (cp_model_load(model, &lo, &m) != CP_OK) {
        cli_report_error("cannot load the model");
        goto out;
    }
    const cp_model_config *c = cp_model_get_config(m);
    cp_model_stats s;
    cp_model_get_stats(m, &s);
    printf("model:           %s\n", model);
    printf("name:            %s\n", c->name[0] ? c->name : "(none)");
    printf("architecture:    %s\n", c->arch);
    printf("parameters:      %lld (%.1f M)\n", (long long)s.n_params, s.n_params / 1e6);
    printf("weight bytes:    %zu (%.1f MB, %.2f bits per weight)\n", s.weight_bytes, s.weight_bytes / 1e6,
           s.n_params ? 8.0 * (double)s.weight_bytes / (double)s.n_params : 0.0);
    printf("layers:          %d\n", c->n_layer);
    printf("hidden size:     %d\n", c->dim);
    printf("heads:           %d query, %d key/value, head size %d\n", c->n_head, c->n_head_kv, c->head_dim);
    printf("ffn size:        %d\n", c->ffn_dim);
    printf("vocabulary:      %d\n", c->n_vocab);
    printf("context length:  %d\n", c->ctx_train);
    printf("rope:            %s, theta %g, %d dims, scale %g%s\n",
           c->rope_mode == CP_ROPE_HALF ? "half-split" : "interleaved", (double)c->rope_theta, c->rot_dim,
           (double)c->rope_freq_scale, c->rope_llama3_factor > 0 ? ", llama3 scaling" : "");
    printf("rms epsilon:     %g\n", (double)c->norm_eps);
    printf("tied embeddings: %s\n", c->tied_embeddings ? "yes" : "no");
    printf("qkv bias:        %s\n", c->qkv_bias ? "yes" : "no");
    printf("tensor types:\n");
    for (int t = 0; t < CP_DTYPE_COUNT; t++)
        if (s.count_by_dtype[t])
            printf("  %-6s %4lld tensors %12zu bytes\n", cp_dtype_name((cp_dtype)t),
                   (long long)s.count_by_dtype[t], s.bytes_by_dtype[t]);
    cp_gguf_t g = cp_model_gguf(m);
    if (g) {
        printf("file:            GGUF v%u, %zu bytes, %lld tensors, %lld metadata keys\n", cp_gguf_version(g),
               cp_gguf_file_size(g), (long long)cp_gguf_n_tensors(g), (long long)cp_gguf_n_kv(g));
        if (cp_tokenizer_init_gguf(g, &tok) == CP_OK) {
            char tm[32] = "?";
            cp_gguf_get_str_buf(g, "tokenizer.ggml.model", tm, sizeof(tm));
            printf("tokenizer:       %s, %d tokens, bos %d, eos %d\n", tm, cp_tokenizer_n_vocab(tok),
                   cp_tokenizer_bos(tok), cp_tokenizer_eos(tok));
        } else {
            printf("tokenizer:       unusable (%s)\n", cp_last_error_detail());
        }
        if (tensors)
            for (int64_t i = 0; i < cp_gguf_n_tensors(g); i++) {
                const cp_weight_info *w = cp_gguf_tensor(g, i);
                printf("  %-32s %-5s [%lld, %lld, %lld, %lld] %zu bytes\n", w->name, cp_dtype_name(w->dtype),
                       (long long)w->ne[0], (long long)w->ne[1], (long long)w->ne[2], (long long)w->ne[3],
                       w->nbytes);
            }
    }
    const int tp = par.tp, pp = par.pp, cp = par.cp;
    if (tp * cp * pp > 1) {
        if (cp > 1)
            printf("sharding:        tp=%d x cp=%d x pp=%d (rank = (stage * cp + cp rank) * tp + tp rank; the cp "
                   "ranks of a stage and TP rank hold the same weights)\n",
                   tp, cp, pp);
        else
            printf("sharding:        tp=%d x pp=%d (rank = stage * tp + tp rank)\n", tp, pp);
        if (par.edge)
            printf("edge stages:     %d layer%s fewer each on the first and the last stage, given to the middle "
                   "ones\n",
                   par.edge, par.edge > 1 ? "s" : "");
        printf("  %4s %5s%s %3s %9s %9s %11s %13s %14s %8s\n", "rank", "stage", cp > 1 ? "  cp" : "", "tp", "layers",
               "heads", "kv heads", "ffn cols", "vocab rows", "MB");
        for (int r = 0; r < tp * cp * pp; r++) {
            cp_model_load_opts so = {.backend = be, .tp = tp, .pp = pp, .cp = cp, .rank = r,
                                     .edge_layer_discount = par.edge, .inspect_only = true};
            cp_model_t sm = NULL;
            if (cp_model_load(model, &so, &sm) != CP_OK) {
                cli_report_error("cannot shard the model");
                rc = 1;
                goto out;
            }
            const cp_plan *p = cp_model_get_plan(sm);
            cp_model_stats ss;
            cp_model_get_stats(sm, &ss);
            char lay[24], hd[24], kv[24], ff[24], vo[24];
            snprintf(lay, sizeof(lay), "%d-%d", p->layer_begin, p->layer_end - 1);
            snprintf(hd, sizeof(hd), "%d-%d", p->head_begin, p->head_end - 1);
            snprintf(kv, sizeof(kv), "%d-%d%s", p->kv_head_begin, p->kv_head_end - 1, p->kv_replicas > 1 ? "*" : "");
            snprintf(ff, sizeof(ff), "%d-%d", p->ffn_begin, p->ffn_end - 1);
            snprintf(vo, sizeof(vo), "%d-%d", p->vocab_begin, p->vocab_end - 1);
            char cpr[8] = "";
            if (cp > 1) snprintf(cpr, sizeof(cpr), " %3d", p->cp_rank);
            printf("  %4d %5d%s %3d %9s %9s %11s %13s %14s %8.1f\n", r, p->pp_rank, cpr, p->tp_rank, lay, hd, kv, ff,
                   vo, ss.weight_bytes / 1e6);
            cp_model_free(sm);
        }
    }
    rc = 0;
out:
    cp_tokenizer_free(tok);
    cp_model_free(m);
    cp_backend_free(be);
    return rc;
}

/* ---- main --------------------------------------------------------------- */

static void usage(FILE *f) {
    fprintf(f,
            "cparallel %s - serve and run large language models across ranks\n\n"
            "usage: cparallel <command> [options]\n\n"
            "commands:\n"
            "  distill    a teacher's continuations and top-k log-probabilities for distillation\n"
            "  eval       perplexity on a text; KL and top-1 agreement against a reference\n"
            "  generate   generate text from a prompt\n"
            "  inspect    print a model's architecture, size and tensor types\n"
            "  prune      remove weights, layers, heads or MLP channels, accuracy checked\n"
            "  quantize   rewrite a GGUF model in a smaller weight type, accuracy checked\n"
            "  route      route OpenAI API requests across deployments, with failover\n"
            "  serve      serve the model over an OpenAI-compatible HTTP API\n"
            "  synth      write a random-weight model of a real architecture (benchmarks)\n"
            "  version    print the version\n\n"
            "'cparallel <command> --help' describes each command's options.\n",
            VERSION);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "generate")) return cmd_generate(argc, argv);
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc, argv);
    if (!strcmp(cmd, "eval")) return cp_cli_eval(argc, argv);
    if (!strcmp(cmd, "distill")) return cp_cli_distill(argc, argv);
    if (!strcmp(cmd, "quantize")) return cp_cli_quantize(argc, argv);
    if (!strcmp(cmd, "prune")) return cp_cli_prune(argc, argv);
    if (!strcmp(cmd, "synth")) return cp_cli_synth(argc, argv);
    if (!strcmp(cmd, "serve")) return cp_cli_serve(argc, argv);
    if (!strcmp(cmd, "route")) return cp_cli_route(argc, argv);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("cparallel %s\n", VERSION);
        return 0;
    }
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "cparallel: error: unknown command '%s' (see 'cparallel --help')\n", cmd);
    return 2;
}
