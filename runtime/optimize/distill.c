/* distill.c - a teacher's continuations of a prompts file and its top-k
 * next-token log-probabilities at every position, written for logit
 * distillation (see cp_distill.h; the format is described in README.md).
 * Each sequence is generated, then scored again in chunks on the engine's
 * KV cache; the log-softmax and top-k run on host threads, in double. */
#include "cp_distill.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cp_model.h"
#include "cp_tokenizer.h"

/* ---- the prompts file --------------------------------------------------- */

typedef struct prompt {
    int line;          /* 1-based line of the file */
    char *id_json;     /* the given "id" as compact JSON, or NULL */
    char *text;        /* a "prompt" line, else NULL */
    cp_chat_msg *msgs; /* a "messages" line: roles and contents owned */
    size_t n_msgs;
} prompt;

struct cp_distill_prompts {
    char *path;
    prompt *v;
    size_t n, cap, n_chat;
};

static void prompt_clear(prompt *p) {
    free(p->id_json);
    free(p->text);
    for (size_t i = 0; i < p->n_msgs; i++) {
        free((char *)p->msgs[i].role);
        free((char *)p->msgs[i].content);
    }
    free(p->msgs);
}

void cp_distill_prompts_free(cp_distill_prompts_t p) {
    if (!p) return;
    for (size_t i = 0; i < p->n; i++)
        prompt_clear(&p->v[i]);
    free(p->v);
    free(p->path);
    free(p);
}

size_t cp_distill_prompts_count(cp_distill_prompts_t p) {
    return p ? p->n : 0;
}
size_t cp_distill_prompts_n_chat(cp_distill_prompts_t p) {
    return p ? p->n_chat : 0;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static bool blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return false;
    return true;
}

/* One parsed line into *p; a message naming path:line on error. */
static cp_status parse_line(const char *path, int line, const char *s, size_t n, prompt *p) {
    memset(p, 0, sizeof(*p));
    p->line = line;
    json_error_t jerr;
    json_t *o = json_loadb(s, n, 0, &jerr);
    if (!o) return CP_ERROR(CP_ERR_FORMAT, "%s:%d: not valid JSON (%s)", path, line, jerr.text);
    cp_status st = CP_OK;
    const json_t *jp = json_object_get(o, "prompt"), *jm = json_object_get(o, "messages");
    const json_t *jid = json_object_get(o, "id");
    if (!json_is_object(o)) {
        st = CP_ERROR(CP_ERR_FORMAT,
                      "%s:%d: expected a JSON object with \"prompt\" or \"messages\"", path, line);
        goto fail;
    }
    if (!jp == !jm) {
        st = CP_ERROR(CP_ERR_FORMAT, "%s:%d: %s", path, line,
                      jp ? "give \"prompt\" or \"messages\", not both"
                         : "the object has neither \"prompt\" nor \"messages\"");
        goto fail;
    }
    if (jid && !json_is_null(jid)) {
        p->id_json = json_dumps(jid, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!p->id_json) goto oom;
    }
    if (jp) {
        if (!json_is_string(jp)) {
            st = CP_ERROR(CP_ERR_FORMAT, "%s:%d: \"prompt\" must be a string", path, line);
            goto fail;
        }
        if (!(p->text = dup_str(json_string_value(jp)))) goto oom;
        json_decref(o);
        return CP_OK;
    }
    size_t nm = json_is_array(jm) ? json_array_size(jm) : 0;
    if (nm == 0) {
        st = CP_ERROR(CP_ERR_FORMAT, "%s:%d: \"messages\" must be a non-empty array", path, line);
        goto fail;
    }
    if (!(p->msgs = calloc(nm, sizeof(cp_chat_msg)))) goto oom;
    for (size_t i = 0; i < nm; i++) {
        const json_t *m = json_array_get(jm, i);
        const json_t *role = json_object_get(m, "role"), *content = json_object_get(m, "content");
        const char *r = json_is_string(role) ? json_string_value(role) : "";
        if (!strcmp(r, "developer")) r = "system"; /* OpenAI's newer name */
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant")) {
            st = CP_ERROR(CP_ERR_FORMAT,
                          "%s:%d: messages[%zu].role must be system, developer, user or assistant",
                          path, line, i);
            goto fail;
        }
        if (!json_is_string(content)) {
            st = CP_ERROR(CP_ERR_FORMAT, "%s:%d: messages[%zu].content must be a string", path,
                          line, i);
            goto fail;
        }
        p->n_msgs = i + 1;
        p->msgs[i].role = dup_str(r);
        p->msgs[i].content = dup_str(json_string_value(content));
        if (!p->msgs[i].role || !p->msgs[i].content) goto oom;
    }
    json_decref(o);
    return CP_OK;
oom:
    st = CP_ERROR(CP_ERR_OOM, "out of memory reading %s", path);
fail:
    json_decref(o);
    prompt_clear(p);
    memset(p, 0, sizeof(*p));
    return st;
}

cp_status cp_distill_prompts_load(const char *path, cp_distill_prompts_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_distill_prompts_load: NULL argument");
    *out = NULL;
    if (!path) return CP_ERROR(CP_ERR_INVALID_ARG, "no prompts file given");
    FILE *f = fopen(path, "rb");
    if (!f)
        return CP_ERROR(CP_ERR_IO, "cannot open the prompts file '%s': %s", path, strerror(errno));
    cp_status st = CP_OK;
    char *buf = NULL;
    size_t cap = 0;
    cp_distill_prompts_t ps = calloc(1, sizeof(*ps));
    if (!ps || !(ps->path = dup_str(path))) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory");
        goto fail;
    }
    for (int line = 1;; line++) {
        errno = 0;
        ssize_t got = getline(&buf, &cap, f);
        if (got < 0) {
            if (ferror(f)) {
                st = CP_ERROR(CP_ERR_IO, "cannot read the prompts file '%s': %s", path,
                              strerror(errno ? errno : EIO));
                goto fail;
            }
            break;
        }
        const char *s = buf;
        size_t n = (size_t)got;
        if (line == 1 && n >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) { /* a UTF-8 byte-order mark */
            s += 3;
            n -= 3;
        }
        if (blank(s, n)) continue;
        if (ps->n == ps->cap) {
            size_t nc = ps->cap ? 2 * ps->cap : 64;
            prompt *nv = realloc(ps->v, nc * sizeof(prompt));
            if (!nv) {
                st = CP_ERROR(CP_ERR_OOM, "out of memory reading %s", path);
                goto fail;
            }
            ps->v = nv;
            ps->cap = nc;
        }
        CP_CHECK_GOTO(parse_line(path, line, s, n, &ps->v[ps->n]), st, fail);
        ps->n_chat += ps->v[ps->n].msgs != NULL;
        ps->n++;
    }
    if (ps->n == 0) {
        st = CP_ERROR(CP_ERR_FORMAT, "the prompts file '%s' holds no prompt", path);
        goto fail;
    }
    free(buf);
    fclose(f);
    *out = ps;
    return CP_OK;
fail:
    free(buf);
    fclose(f);
    cp_distill_prompts_free(ps);
    return st;
}

/* ---- the output directory ---------------------------------------------- */

static const char *const OUT_FILES[] = {"meta.json", "samples.jsonl", "topk_ids.bin",
                                        "topk_logprobs.bin", "token_logprobs.bin"};
enum { F_META, F_SAMPLES, F_IDS, F_LPS, F_TOK, N_FILES };

static cp_status join(char *dst, size_t cap, const char *dir, const char *name, const char *ext) {
    if (snprintf(dst, cap, "%s/%s%s", dir, name, ext) >= (int)cap)
        return CP_ERROR(CP_ERR_INVALID_ARG, "the output path '%s' is too long", dir);
    return CP_OK;
}

cp_status cp_distill_prepare_dir(const char *dir, bool force) {
    if (!dir || !*dir) return CP_ERROR(CP_ERR_INVALID_ARG, "no output directory given");
    struct stat sb;
    if (stat(dir, &sb) != 0) {
        if (errno != ENOENT)
            return CP_ERROR(CP_ERR_IO, "cannot use the output directory '%s': %s", dir,
                            strerror(errno));
        if (mkdir(dir, 0777) != 0)
            return CP_ERROR(CP_ERR_IO, "cannot create the output directory '%s': %s", dir,
                            strerror(errno));
        return CP_OK;
    }
    if (!S_ISDIR(sb.st_mode))
        return CP_ERROR(CP_ERR_IO, "the output '%s' exists and is not a directory", dir);
    DIR *d = opendir(dir);
    if (!d)
        return CP_ERROR(CP_ERR_IO, "cannot list the output directory '%s': %s", dir,
                        strerror(errno));
    bool empty = true;
    for (struct dirent *de; (de = readdir(d));)
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) empty = false;
    closedir(d);
    if (empty) return CP_OK;
    if (!force)
        return CP_ERROR(CP_ERR_IO,
                        "the output directory '%s' is not empty (--force replaces an earlier run)",
                        dir);
    /* meta.json first: from here on the directory no longer claims to be complete */
    char path[4096];
    for (int i = 0; i < N_FILES; i++)
        for (int tmp = 0; tmp < 2; tmp++) {
            CP_CHECK(join(path, sizeof(path), dir, OUT_FILES[i], tmp ? ".tmp" : ""));
            if (unlink(path) != 0 && errno != ENOENT)
                return CP_ERROR(CP_ERR_IO, "cannot remove '%s': %s", path, strerror(errno));
        }
    return CP_OK;
}

/* ---- JSON text ---------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s[0..n), or 0 when it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4, min = 0x10000;
    else
        return 0;
    if (n < len) return 0;
    unsigned cp = c & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* s[0..n) as a JSON string; bytes that are not valid UTF-8 (a character
 * cut by the token limit) become U+FFFD, as Python's errors="replace". */
static void json_text(FILE *f, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t l = utf8_len(u + i, n - i);
        if (l == 0) {
            fputs("\\ufffd", f);
            i++;
        } else if (l > 1) {
            fwrite(u + i, 1, l, f);
            i += l;
        } else {
            if (c == '"' || c == '\\')
                fprintf(f, "\\%c", c);
            else if (c == '\n')
                fputs("\\n", f);
            else if (c == '\t')
                fputs("\\t", f);
            else if (c == '\r')
                fputs("\\r", f);
            else if (c < 0x20 || c == 0x7F)
                fprintf(f, "\\u%04x", c);
            else
                fputc((int)c, f);
            i++;
        }
    }
    fputc('"', f);
}

static void json_ids(FILE *f, const int32_t *ids, size_t n) {
    fputc('[', f);
    for (size_t i = 0; i < n; i++)
        fprintf(f, i ? ",%d" : "%d", (int)ids[i]);
    fputc(']', f);
}

/* ---- little-endian arrays ---------------------------------------------- */

static bool host_le(void) {
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* Writes n 4-byte values little-endian (swapped in place on big-endian hosts). */
static bool write_le32(FILE *f, void *data, size_t n) {
    if (!host_le()) {
        unsigned char *p = data;
        for (size_t i = 0; i < n; i++, p += 4) {
            unsigned char t = p[0];
            p[0] = p[3];
            p[3] = t;
            t = p[1];
            p[1] = p[2];
            p[2] = t;
        }
    }
    return fwrite(data, 4, n, f) == n;
}

/* ---- log-softmax and top-k --------------------------------------------- */

/* The rows of one chunk as log-probabilities: top_lps[r][K] = val - lse and
 * tok_lp[r] = the target's logit - lse, from cp_model_forward_top (the K
 * best of each row and its log-sum-exp without gathering the vocabulary
 * across TP ranks). Returns the first row whose log-sum-exp is not finite,
 * or -1. */
static int to_logprobs(const cp_logit_top *t, int n, int K, float *top_lps, float *tok_lp) {
    for (int r = 0; r < n; r++) {
        const double lse = t->lse[r];
        if (!isfinite(lse)) return r;
        for (int k = 0; k < K; k++)
            top_lps[(size_t)r * K + k] = (float)((double)t->val[(size_t)r * K + k] - lse);
        tok_lp[r] = (float)((double)t->target_logit[r] - lse);
    }
    return -1;
}

/* ---- the run ------------------------------------------------------------ */

typedef struct gen_acc {
    cp_tokenizer_t tok;
    int32_t *seq; /* prompt, then the continuation */
    int n, cap;
    char *text;
    size_t text_len, text_cap;
    bool oom, eog;
} gen_acc;

static bool on_token(void *user, int32_t token, const char *piece, size_t len) {
    gen_acc *a = user;
    if (a->n >= a->cap) return false; /* cannot happen: the context bounds it */
    a->seq[a->n++] = token;
    /* generation runs with ignore_eos so that the end-of-generation token
     * is seen and kept: the student learns where the teacher stops */
    if (cp_tokenizer_is_eog(a->tok, token)) {
        a->eog = true;
        return false;
    }
    if (a->text_len + len + 1 > a->text_cap) {
        size_t nc = a->text_cap ? 2 * a->text_cap : 1024;
        while (nc < a->text_len + len + 1)
            nc *= 2;
        char *nt = realloc(a->text, nc);
        if (!nt) {
            a->oom = true;
            return false;
        }
        a->text = nt;
        a->text_cap = nc;
    }
    memcpy(a->text + a->text_len, piece, len);
    a->text_len += len;
    return true;
}

typedef struct out_files {
    FILE *f[N_FILES];
    char tmp[N_FILES][4096], fin[N_FILES][4096];
} out_files;

static cp_status open_files(out_files *o, const char *dir) {
    for (int i = 0; i < N_FILES; i++) {
        CP_CHECK(join(o->tmp[i], sizeof(o->tmp[i]), dir, OUT_FILES[i], ".tmp"));
        CP_CHECK(join(o->fin[i], sizeof(o->fin[i]), dir, OUT_FILES[i], ""));
        if (i == F_META) continue; /* written at the end */
        o->f[i] = fopen(o->tmp[i], "wb");
        if (!o->f[i])
            return CP_ERROR(CP_ERR_IO, "cannot create '%s': %s", o->tmp[i], strerror(errno));
    }
    return CP_OK;
}

static cp_status close_file(out_files *o, int i) {
    FILE *f = o->f[i];
    o->f[i] = NULL;
    bool ok = fflush(f) == 0 && !ferror(f) && fsync(fileno(f)) == 0;
    int err = errno;
    ok = fclose(f) == 0 && ok;
    if (!ok)
        return CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", o->tmp[i], strerror(err ? err : EIO));
    return CP_OK;
}

static void drop_files(out_files *o) {
    for (int i = 0; i < N_FILES; i++) {
        if (o->f[i]) fclose(o->f[i]);
        o->f[i] = NULL;
        if (o->tmp[i][0]) unlink(o->tmp[i]);
    }
}

static const char *finish_name(cp_stop_reason r, bool eog) {
    if (eog) return "stop";
    return r == CP_STOP_CONTEXT ? "context" : "length";
}

static cp_status write_meta(out_files *o, const cp_distill_opts *op, cp_engine_t e,
                            const cp_distill_result *r, int max_tokens) {
    FILE *f = fopen(o->tmp[F_META], "wb");
    if (!f) return CP_ERROR(CP_ERR_IO, "cannot create '%s': %s", o->tmp[F_META], strerror(errno));
    o->f[F_META] = f;
    cp_tokenizer_t tok = cp_engine_tokenizer(e);
    const char *teacher = op->teacher ? op->teacher : cp_model_path(cp_engine_model(e));
    fprintf(f, "{\n  \"format\": \"%s\",\n  \"version\": %d,\n  \"teacher\": ", CP_DISTILL_FORMAT,
            CP_DISTILL_VERSION);
    json_text(f, teacher ? teacher : "", teacher ? strlen(teacher) : 0);
    fputs(",\n  \"prompts\": ", f);
    const char *pp = op->prompts_path ? op->prompts_path : "";
    json_text(f, pp, strlen(pp));
    fprintf(f,
            ",\n  \"vocab_size\": %d,\n  \"top_k\": %d,\n  \"completion_only\": %s,\n"
            "  \"logprobs\": \"log-softmax of the full-vocabulary logits at temperature 1, "
            "computed in double, stored as float32\",\n",
            r->n_vocab, r->top_k, op->completion_only ? "true" : "false");
    fprintf(f, "  \"rows\": \"%s\",\n",
            op->completion_only
                ? "row j of a sample predicts completion_ids[j] (after prompt_ids and "
                  "completion_ids[0..j))"
                : "row j of a sample predicts tokens[j + 1] of tokens = prompt_ids + "
                  "completion_ids (after tokens[0..j])");
    fprintf(f,
            "  \"tokenizer\": {\"bos_id\": %d, \"eos_id\": %d, \"add_bos\": %s, "
            "\"chat_template\": %s},\n",
            (int)cp_tokenizer_bos(tok), (int)cp_tokenizer_eos(tok),
            cp_tokenizer_add_bos(tok) ? "true" : "false",
            cp_tokenizer_chat_template(tok) ? "true" : "false");
    fprintf(f,
            "  \"counts\": {\"samples\": %lld, \"rows\": %lld, \"prompt_tokens\": %lld, "
            "\"completion_tokens\": %lld, \"finish_stop\": %d, \"finish_length\": %d, "
            "\"finish_context\": %d},\n",
            (long long)r->n_samples, (long long)r->n_rows, (long long)r->n_prompt_tokens,
            (long long)r->n_gen_tokens, r->n_stop, r->n_length, r->n_context);
    fprintf(f,
            "  \"generation\": {\"max_tokens\": %d, \"temperature\": %.9g, \"top_p\": %.9g, "
            "\"seed\": %llu, \"seed_per_prompt\": \"seed + index of the prompt in the file\", "
            "\"chat\": %s, \"context\": %d},\n",
            max_tokens, (double)op->temperature,
            op->top_p > 0 && op->top_p < 1 ? (double)op->top_p : 1.0, (unsigned long long)op->seed,
            r->chat ? "true" : "false", cp_engine_n_ctx(e));
    fprintf(f,
            "  \"files\": {\n"
            "    \"samples\": {\"name\": \"samples.jsonl\", \"format\": \"jsonl\", "
            "\"lines\": %lld},\n"
            "    \"topk_ids\": {\"name\": \"topk_ids.bin\", \"dtype\": \"int32\", "
            "\"endian\": \"little\", \"shape\": [%lld, %d]},\n"
            "    \"topk_logprobs\": {\"name\": \"topk_logprobs.bin\", \"dtype\": \"float32\", "
            "\"endian\": \"little\", \"shape\": [%lld, %d], \"order\": \"descending per row\"},\n"
            "    \"token_logprobs\": {\"name\": \"token_logprobs.bin\", \"dtype\": \"float32\", "
            "\"endian\": \"little\", \"shape\": [%lld]}\n"
            "  }\n}\n",
            (long long)r->n_samples, (long long)r->n_rows, r->top_k, (long long)r->n_rows, r->top_k,
            (long long)r->n_rows);
    return close_file(o, F_META);
}

cp_status cp_distill_run(cp_engine_t e, cp_distill_prompts_t ps, const char *out_dir,
                         const cp_distill_opts *opts, cp_distill_result *res) {
    if (!e || !ps || !opts || !res || (opts->write && !out_dir))
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_distill_run: NULL argument");
    memset(res, 0, sizeof(*res));
    const cp_distill_opts *op = opts;
    cp_tokenizer_t tok = cp_engine_tokenizer(e);
    if (!tok) return CP_ERROR(CP_ERR_INVALID_ARG, "the teacher was loaded without a tokenizer");
    cp_model_t m = cp_engine_model(e);
    cp_kv_cache_t kv = cp_engine_kv(e);
    const int V = cp_model_get_config(m)->n_vocab, n_ctx = cp_engine_n_ctx(e);
    const int K = op->top_k > 0 ? op->top_k : 20;
    const int max_tokens = op->max_tokens > 0 ? op->max_tokens : 128;
    if (K > CP_DISTILL_MAX_K || K > V)
        return CP_ERROR(CP_ERR_INVALID_ARG, "top-k %d is above %d (the limit%s)", K,
                        K > V ? V : CP_DISTILL_MAX_K, K > V ? " of the vocabulary" : "");
    if (!(op->temperature >= 0) || !isfinite(op->temperature))
        return CP_ERROR(CP_ERR_INVALID_ARG, "the temperature must be 0 or more");
    const bool chat = op->chat == CP_DISTILL_CHAT_ON ||
                      (op->chat == CP_DISTILL_CHAT_AUTO && cp_tokenizer_chat_template(tok));
    const char *path = ps->path;
    if (op->chat == CP_DISTILL_CHAT_OFF)
        for (size_t i = 0; i < ps->n; i++)
            if (ps->v[i].msgs)
                return CP_ERROR(CP_ERR_INVALID_ARG,
                                "%s:%d: \"messages\" need the chat template, which --no-chat "
                                "turns off",
                                path, ps->v[i].line);
    res->top_k = K;
    res->n_vocab = V;
    res->chat = chat;

    cp_status st = CP_OK;
    const size_t N = ps->n;
    int32_t **pids = calloc(N, sizeof(int32_t *));
    int *np = calloc(N, sizeof(int));
    const int bs = cp_kv_cache_block_size(kv), max_blocks = (n_ctx + bs - 1) / bs;
    /* one chunk of rows at a time: the model's batch */
    const int chunk = cp_model_max_batch(m);
    float *top_val = malloc((size_t)chunk * K * sizeof(float)), *target_logit = malloc((size_t)chunk * sizeof(float));
    double *lse = malloc((size_t)chunk * sizeof(double));
    uint8_t *row_need = malloc((size_t)chunk);
    int32_t *table = malloc((size_t)max_blocks * sizeof(int32_t));
    int32_t *pos = malloc((size_t)chunk * sizeof(int32_t)),
            *seqi = calloc((size_t)chunk, sizeof(int32_t));
    int32_t *lrows = malloc((size_t)chunk * sizeof(int32_t)),
            *target = malloc((size_t)chunk * sizeof(int32_t));
    int32_t *top_ids = malloc((size_t)chunk * K * sizeof(int32_t));
    float *top_lps = malloc((size_t)chunk * K * sizeof(float)),
          *tok_lp = malloc((size_t)chunk * sizeof(float));
    gen_acc acc = {.tok = tok, .cap = n_ctx + 1};
    acc.seq = malloc((size_t)acc.cap * sizeof(int32_t));
    out_files of;
    memset(&of, 0, sizeof(of));
    int have = 0;
    if (!pids || !np || !top_val || !target_logit || !lse || !row_need || !table || !pos || !seqi || !lrows ||
        !target || !top_ids || !top_lps || !tok_lp || !acc.seq) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for %d rows of %d candidates", chunk, K);
        goto done;
    }

    /* every prompt is tokenized and checked before the first is generated */
    for (size_t i = 0; i < N; i++) {
        const prompt *p = &ps->v[i];
        size_t n = 0;
        cp_status s;
        if (p->msgs) {
            s = cp_tokenizer_encode_chat(tok, p->msgs, p->n_msgs, CP_CHAT_GENERATION_PROMPT,
                                         &pids[i], &n, NULL);
        } else if (chat) {
            cp_chat_msg um = {"user", p->text};
            s = cp_tokenizer_encode_chat(tok, &um, 1, CP_CHAT_GENERATION_PROMPT, &pids[i], &n,
                                         NULL);
        } else {
            s = cp_tokenizer_encode(tok, p->text, strlen(p->text), true, false, &pids[i], &n);
        }
        if (s != CP_OK) {
            st = CP_ERROR(s, "%s:%d: cannot tokenize the prompt: %s", path, p->line,
                          cp_last_error_detail());
            goto done;
        }
        if (n == 0) {
            st = CP_ERROR(CP_ERR_INVALID_ARG, "%s:%d: the prompt is empty", path, p->line);
            goto done;
        }
        if (n >= (size_t)n_ctx) {
            st = CP_ERROR(CP_ERR_INVALID_ARG,
                          "%s:%d: the prompt has %zu tokens but the context holds %d (raise "
                          "--ctx-size or shorten the prompt)",
                          path, p->line, n, n_ctx);
            goto done;
        }
        np[i] = (int)n;
    }
    if (op->write) CP_CHECK_GOTO(open_files(&of, out_dir), st, done);

    const double t0 = cp_time_now();
    int64_t row = 0;
    for (size_t i = 0; i < N; i++) {
        const prompt *p = &ps->v[i];
        const int P = np[i];
        memcpy(acc.seq, pids[i], (size_t)P * sizeof(int32_t));
        acc.n = P;
        acc.text_len = 0;
        acc.eog = false;
        cp_gen_params gp = {
            .sample = {.temperature = op->temperature,
                       .top_k = 0,
                       .top_p = op->top_p > 0 ? op->top_p : 1.0f},
            .seed = op->seed + (uint64_t)i,
            .max_tokens = max_tokens,
            .ignore_eos = true,
        };
        cp_gen_stats gs;
        CP_CHECK_GOTO(cp_engine_generate(e, pids[i], P, &gp, on_token, &acc, &gs), st, done);
        if (acc.oom) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory for the continuation text");
            goto done;
        }
        const int T = acc.n, C = T - P;
        /* tokens[0..T-1) are fed; row t predicts tokens[t + 1] */
        const int n_feed = T - 1, first = op->completion_only ? P - 1 : 0;
        const int n_rows = n_feed - first;
        const int n_blocks = (n_feed + bs - 1) / bs;
        CP_CHECK_GOTO(cp_kv_cache_alloc_blocks(kv, n_blocks, table), st, done);
        have = n_blocks;
        for (int i0 = 0; i0 < n_feed; i0 += chunk) {
            const int k = n_feed - i0 < chunk ? n_feed - i0 : chunk;
            int nl = 0;
            for (int t = 0; t < k; t++) {
                pos[t] = i0 + t;
                if (i0 + t >= first) {
                    lrows[nl] = t;
                    target[nl] = acc.seq[i0 + t + 1];
                    nl++;
                }
            }
            cp_batch b = {.n_tok = k,
                          .tokens = acc.seq + i0,
                          .pos = pos,
                          .seq = seqi,
                          .block_tables = table,
                          .n_seq = 1,
                          .max_blocks = max_blocks,
                          .logit_rows = lrows,
                          .n_logits = nl};
            for (int r = 0; r < nl; r++)
                row_need[r] = CP_TOP_LSE | CP_TOP_TARGET;
            const cp_logit_top top = {.k = K,
                                      .need = row_need,
                                      .val = top_val,
                                      .id = top_ids,
                                      .lse = lse,
                                      .target = target,
                                      .target_logit = target_logit};
            CP_CHECK_GOTO(cp_model_forward_top(m, kv, &b, &top), st, done);
            if (!op->write || nl == 0) continue;
            const int bad = to_logprobs(&top, nl, K, top_lps, tok_lp);
            if (bad >= 0) {
                st = CP_ERROR(CP_ERR_INTERNAL,
                              "%s:%d: the teacher's logits at position %d are not finite", path,
                              p->line, i0 + lrows[bad]);
                goto done;
            }
            if (!write_le32(of.f[F_IDS], top_ids, (size_t)nl * K) ||
                !write_le32(of.f[F_LPS], top_lps, (size_t)nl * K) ||
                !write_le32(of.f[F_TOK], tok_lp, (size_t)nl)) {
                st = CP_ERROR(CP_ERR_IO, "cannot write the arrays in '%s': %s", out_dir,
                              strerror(errno));
                goto done;
            }
        }
        cp_kv_cache_release_blocks(kv, table, have);
        have = 0;
        if (op->write) {
            FILE *f = of.f[F_SAMPLES];
            fputs("{\"id\":", f);
            if (p->id_json)
                fputs(p->id_json, f);
            else
                fprintf(f, "%d", p->line - 1);
            fputs(",\"prompt_ids\":", f);
            json_ids(f, acc.seq, (size_t)P);
            fputs(",\"completion_ids\":", f);
            json_ids(f, acc.seq + P, (size_t)C);
            fputs(",\"completion\":", f);
            json_text(f, acc.text ? acc.text : "", acc.text_len);
            fprintf(f, ",\"finish_reason\":\"%s\",\"row_begin\":%lld,\"n_rows\":%d}\n",
                    finish_name(gs.stop, acc.eog), (long long)row, n_rows);
            if (ferror(f)) {
                st = CP_ERROR(CP_ERR_IO, "cannot write '%s': %s", of.tmp[F_SAMPLES],
                              strerror(errno));
                goto done;
            }
        }
        row += n_rows;
        res->n_samples++;
        res->n_rows = row;
        res->n_prompt_tokens += P;
        res->n_gen_tokens += C;
        if (acc.eog)
            res->n_stop++;
        else if (gs.stop == CP_STOP_CONTEXT)
            res->n_context++;
        else
            res->n_length++;
        res->seconds = cp_time_now() - t0;
        if (op->progress) {
            cp_distill_progress pr = {i + 1, N, res->n_gen_tokens, row, res->seconds};
            op->progress(op->progress_user, &pr);
        }
    }
    if (op->write) {
        for (int i = F_SAMPLES; i < N_FILES; i++)
            CP_CHECK_GOTO(close_file(&of, i), st, done);
        CP_CHECK_GOTO(write_meta(&of, op, e, res, max_tokens), st, done);
        /* the data first, meta.json last: a directory with meta.json is whole */
        for (int i = F_SAMPLES; i <= N_FILES; i++) {
            int f = i == N_FILES ? F_META : i;
            if (rename(of.tmp[f], of.fin[f]) != 0) {
                st = CP_ERROR(CP_ERR_IO, "cannot rename '%s' to '%s': %s", of.tmp[f], of.fin[f],
                              strerror(errno));
                goto done;
            }
        }
        memset(of.tmp, 0, sizeof(of.tmp));
    }
    res->seconds = cp_time_now() - t0;
done:
    if (have) cp_kv_cache_release_blocks(kv, table, have);
    if (st != CP_OK) drop_files(&of);
    for (size_t i = 0; pids && i < N; i++)
        free(pids[i]);
    free(pids);
    free(np);
    free(top_val);
    free(target_logit);
    free(lse);
    free(row_need);
    free(table);
    free(pos);
    free(seqi);
    free(lrows);
    free(target);
    free(top_ids);
    free(top_lps);
    free(tok_lp);
    free(acc.seq);
    free(acc.text);
    return st;
}
