/* api.c - the OpenAI wire format: validates /v1/completions and
 * /v1/chat/completions request bodies into a gen_spec (tokenized prompt,
 * sampling, stops, logprobs) with 4xx errors that name the field, and
 * writes the response, stream-chunk, model-list and error objects in the
 * shapes OpenAI's clients parse. */
#include "server_impl.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void api_set_error(api_error *e, int status, const char *type, const char *param, const char *code,
                   const char *fmt, ...) {
    e->status = status;
    e->type = type;
    snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
    snprintf(e->code, sizeof(e->code), "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
}

#define BAD(e, param, ...)                                                                         \
    api_set_error((e), 400, "invalid_request_error", (param), NULL, __VA_ARGS__)

char *api_error_body(const api_error *e) {
    json_t *err = json_object();
    json_object_set_new(err, "message", json_text(e->message, strlen(e->message)));
    json_object_set_new(err, "type", json_string(e->type ? e->type : "invalid_request_error"));
    json_object_set_new(err, "param",
                        e->param[0] ? json_text(e->param, strlen(e->param)) : json_null());
    json_object_set_new(err, "code", e->code[0] ? json_string(e->code) : json_null());
    json_t *root = json_object();
    json_object_set_new(root, "error", err);
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return s;
}

void gen_spec_free(gen_spec *g) {
    free(g->prompt);
    for (int i = 0; i < g->n_stop; i++)
        free(g->stop[i]);
    free(g->prompt_text);
    memset(g, 0, sizeof(*g));
}

/* ---- typed field access: 0 absent or null, 1 set, -1 error (in *e) ------ */

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

static int get_int(const json_t *o, const char *key, long long lo, long long hi, long long *out,
                   api_error *e) {
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    double d = json_is_real(v) ? json_real_value(v) : 0.5;
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
    } else if (json_is_real(v) && d == floor(d) && fabs(d) < 9e18) {
        *out = (long long)d;
    } else {
        BAD(e, key, "'%s' must be an integer, got %s", key, type_name(v));
        return -1;
    }
    if (*out < lo || *out > hi) {
        BAD(e, key, "'%s' must be from %lld to %lld, got %lld", key, lo, hi, *out);
        return -1;
    }
    return 1;
}

static int get_num(const json_t *o, const char *key, double lo, double hi, double *out,
                   api_error *e) {
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) {
        BAD(e, key, "'%s' must be a number, got %s", key, type_name(v));
        return -1;
    }
    *out = json_number_value(v);
    if (!(*out >= lo && *out <= hi)) {
        BAD(e, key, "'%s' must be from %g to %g, got %g", key, lo, hi, *out);
        return -1;
    }
    return 1;
}

static int get_bool(const json_t *o, const char *key, bool *out, api_error *e) {
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        BAD(e, key, "'%s' must be a boolean, got %s", key, type_name(v));
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

/* ---- the fields each endpoint takes ---------------------------------------- */

enum { FOR_COMPL = 1, FOR_CHAT = 2, FOR_BOTH = 3 };

static const struct {
    const char *name;
    unsigned kinds;
} FIELDS[] = {
    {"model", FOR_BOTH},
    {"prompt", FOR_COMPL},
    {"messages", FOR_CHAT},
    {"max_tokens", FOR_BOTH},
    {"max_completion_tokens", FOR_CHAT},
    {"temperature", FOR_BOTH},
    {"top_p", FOR_BOTH},
    {"top_k", FOR_BOTH},
    {"min_p", FOR_BOTH},
    {"seed", FOR_BOTH},
    {"stop", FOR_BOTH},
    {"stream", FOR_BOTH},
    {"stream_options", FOR_BOTH},
    {"logprobs", FOR_BOTH},
    {"top_logprobs", FOR_CHAT},
    {"n", FOR_BOTH},
    {"best_of", FOR_COMPL},
    {"user", FOR_BOTH},
    {"presence_penalty", FOR_BOTH},
    {"frequency_penalty", FOR_BOTH},
    {"echo", FOR_COMPL},
    {"suffix", FOR_COMPL},
    {"logit_bias", FOR_BOTH},
    {"ignore_eos", FOR_BOTH},
    {"response_format", FOR_CHAT},
    {"tools", FOR_CHAT},
    {"tool_choice", FOR_CHAT},
    {"parallel_tool_calls", FOR_CHAT},
    {"continue_final_message", FOR_CHAT},
    {"add_generation_prompt", FOR_CHAT},
};

static bool known_field(const char *key, api_kind k) {
    unsigned bit = k == API_CHAT ? FOR_CHAT : FOR_COMPL;
    for (size_t i = 0; i < sizeof(FIELDS) / sizeof(FIELDS[0]); i++)
        if (!strcmp(FIELDS[i].name, key)) return (FIELDS[i].kinds & bit) != 0;
    return false;
}

/* Fields OpenAI defines that this server takes only at their neutral value. */
static bool check_neutral(const json_t *o, api_error *e) {
    double d;
    const char *pen[] = {"presence_penalty", "frequency_penalty"};
    for (int i = 0; i < 2; i++) {
        int r = get_num(o, pen[i], -2.0, 2.0, &d, e);
        if (r < 0) return false;
        if (r > 0 && d != 0.0) {
            api_set_error(e, 400, "invalid_request_error", pen[i], "unsupported_parameter",
                          "'%s' is not supported by this server (only 0)", pen[i]);
            return false;
        }
    }
    long long n;
    const char *ones[] = {"n", "best_of"};
    for (int i = 0; i < 2; i++) {
        int r = get_int(o, ones[i], -(1LL << 40), 1LL << 40, &n, e);
        if (r < 0) return false;
        if (r > 0 && n != 1) {
            api_set_error(e, 400, "invalid_request_error", ones[i], "unsupported_parameter",
                          "'%s' must be 1: this server returns one choice per request, got %lld",
                          ones[i], n);
            return false;
        }
    }
    bool echo = false;
    if (get_bool(o, "echo", &echo, e) < 0) return false;
    if (echo) {
        api_set_error(e, 400, "invalid_request_error", "echo", "unsupported_parameter",
                      "'echo': true is not supported by this server");
        return false;
    }
    const json_t *v = json_object_get(o, "suffix");
    if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0)) {
        api_set_error(e, 400, "invalid_request_error", "suffix", "unsupported_parameter",
                      "'suffix' is not supported by this server");
        return false;
    }
    v = json_object_get(o, "logit_bias");
    if (v && !json_is_null(v)) {
        if (!json_is_object(v)) {
            BAD(e, "logit_bias", "'logit_bias' must be an object, got %s", type_name(v));
            return false;
        }
        if (json_object_size(v) > 0) {
            api_set_error(e, 400, "invalid_request_error", "logit_bias", "unsupported_parameter",
                          "'logit_bias' is not supported by this server");
            return false;
        }
    }
    v = json_object_get(o, "user");
    if (v && !json_is_null(v) && !json_is_string(v)) {
        BAD(e, "user", "'user' must be a string, got %s", type_name(v));
        return false;
    }
    v = json_object_get(o, "response_format");
    if (v && !json_is_null(v)) {
        const json_t *t = json_is_object(v) ? json_object_get(v, "type") : NULL;
        if (!t || !json_is_string(t) || strcmp(json_string_value(t), "text") != 0) {
            api_set_error(e, 400, "invalid_request_error", "response_format",
                          "unsupported_parameter",
                          "'response_format' supports only {\"type\": \"text\"}");
            return false;
        }
    }
    const char *tools[] = {"tools", "tool_choice", "parallel_tool_calls"};
    for (int i = 0; i < 3; i++) {
        v = json_object_get(o, tools[i]);
        if (!v || json_is_null(v) || (json_is_array(v) && json_array_size(v) == 0) ||
            (json_is_string(v) && !strcmp(json_string_value(v), "none")) || json_is_false(v))
            continue;
        api_set_error(e, 400, "invalid_request_error", tools[i], "unsupported_parameter",
                      "'%s' is not supported by this server (no tool calls)", tools[i]);
        return false;
    }
    return true;
}

static bool parse_stop(const json_t *o, gen_spec *g, api_error *e) {
    const json_t *v = json_object_get(o, "stop");
    if (!v || json_is_null(v)) return true;
    const json_t *one[1] = {v};
    size_t n = 1;
    if (json_is_array(v)) {
        n = json_array_size(v);
        if (n > CP_SCHED_MAX_STOP) {
            BAD(e, "stop", "'stop' takes at most %d strings, got %zu", CP_SCHED_MAX_STOP, n);
            return false;
        }
    } else if (!json_is_string(v)) {
        BAD(e, "stop", "'stop' must be a string or an array of strings, got %s", type_name(v));
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *s = json_is_array(v) ? json_array_get(v, i) : one[0];
        if (!json_is_string(s)) {
            BAD(e, "stop", "'stop' must be a string or an array of strings; item %zu is %s", i,
                type_name(s));
            return false;
        }
        if (json_string_length(s) == 0) {
            BAD(e, "stop", "'stop' strings must not be empty");
            return false;
        }
        g->stop[g->n_stop] = strdup(json_string_value(s));
        if (!g->stop[g->n_stop]) {
            api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
            return false;
        }
        g->n_stop++;
    }
    return true;
}

/* A completion prompt: control-token text in it stays text. */
static bool encode_text(const api_ctx *c, const char *text, size_t len, gen_spec *g,
                        api_error *e) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (cp_tokenizer_encode(c->tok, text, len, true, false, &ids, &n) != CP_OK) {
        BAD(e, g->kind == API_CHAT ? "messages" : "prompt", "cannot tokenize the %s: %s",
            g->kind == API_CHAT ? "messages" : "prompt", cp_last_error_detail());
        return false;
    }
    g->prompt = ids;
    g->n_prompt = (int)n;
    return true;
}

static bool parse_prompt(const api_ctx *c, const json_t *o, gen_spec *g, api_error *e) {
    const json_t *v = json_object_get(o, "prompt");
    if (!v || json_is_null(v)) {
        BAD(e, "prompt", "'prompt' is required");
        return false;
    }
    if (json_is_array(v)) {
        size_t n = json_array_size(v);
        if (n == 0) {
            BAD(e, "prompt", "'prompt' is empty");
            return false;
        }
        if (json_is_integer(json_array_get(v, 0))) {
            /* token ids */
            g->prompt = malloc(n * sizeof(int32_t));
            if (!g->prompt) {
                api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
                return false;
            }
            int32_t vocab = cp_tokenizer_n_vocab(c->tok);
            for (size_t i = 0; i < n; i++) {
                const json_t *t = json_array_get(v, i);
                if (!json_is_integer(t)) {
                    BAD(e, "prompt", "'prompt' mixes token ids with %s at index %zu", type_name(t),
                        i);
                    return false;
                }
                json_int_t id = json_integer_value(t);
                if (id < 0 || id >= vocab) {
                    BAD(e, "prompt",
                        "token id %lld at index %zu is outside the vocabulary (0 to %d)",
                        (long long)id, i, vocab - 1);
                    return false;
                }
                g->prompt[i] = (int32_t)id;
            }
            g->n_prompt = (int)n;
            return true;
        }
        if (n > 1) {
            BAD(e, "prompt", "only one prompt per request is supported, got %zu", n);
            return false;
        }
        v = json_array_get(v, 0);
        if (!json_is_string(v)) {
            BAD(e, "prompt",
                "'prompt' must be a string, an array of one string or an array of token ids");
            return false;
        }
    }
    if (!json_is_string(v)) {
        BAD(e, "prompt", "'prompt' must be a string, got %s", type_name(v));
        return false;
    }
    g->prompt_text = strdup(json_string_value(v));
    if (!g->prompt_text) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return false;
    }
    return encode_text(c, json_string_value(v), json_string_length(v), g, e);
}

/* A message's content: a string, null, or an array of {"type":"text"} parts
 * (joined). *out is malloc'd. */
static bool message_content(const json_t *v, size_t i, char **out, api_error *e) {
    char param[64];
    snprintf(param, sizeof(param), "messages[%zu].content", i);
    if (!v || json_is_null(v)) {
        *out = strdup("");
        return *out != NULL;
    }
    if (json_is_string(v)) {
        *out = strdup(json_string_value(v));
        return *out != NULL;
    }
    if (!json_is_array(v)) {
        BAD(e, param, "'%s' must be a string or an array of text parts, got %s", param,
            type_name(v));
        return false;
    }
    sbuf b = {0};
    sb_add(&b, "", 0);
    for (size_t k = 0; k < json_array_size(v); k++) {
        const json_t *part = json_array_get(v, k);
        const json_t *type = json_object_get(part, "type");
        const json_t *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type) ||
            strcmp(json_string_value(type), "text") || !json_is_string(text)) {
            sb_free(&b);
            BAD(e, param,
                "'%s' part %zu is not a {\"type\": \"text\", \"text\": ...} part "
                "(only text content is supported)",
                param, k);
            return false;
        }
        sb_add(&b, json_string_value(text), json_string_length(text));
    }
    if (b.oom) {
        sb_free(&b);
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return false;
    }
    *out = b.p;
    return true;
}

static bool parse_messages(const api_ctx *c, const json_t *o, gen_spec *g, api_error *e) {
    const json_t *v = json_object_get(o, "messages");
    if (!v || json_is_null(v)) {
        BAD(e, "messages", "'messages' is required");
        return false;
    }
    if (!json_is_array(v) || json_array_size(v) == 0) {
        BAD(e, "messages",
            "'messages' must be a non-empty array of {\"role\", \"content\"} objects");
        return false;
    }
    size_t n = json_array_size(v);
    cp_chat_msg *msgs = calloc(n, sizeof(*msgs));
    char **contents = calloc(n, sizeof(char *));
    bool ok = msgs && contents;
    if (!ok) api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
    for (size_t i = 0; ok && i < n; i++) {
        const json_t *m = json_array_get(v, i);
        char param[96];
        snprintf(param, sizeof(param), "messages[%zu]", i);
        if (!json_is_object(m)) {
            BAD(e, param, "'%s' must be an object, got %s", param, type_name(m));
            ok = false;
            break;
        }
        const char *key;
        const json_t *val;
        json_object_foreach((json_t *)m, key, val) {
            if (strcmp(key, "role") && strcmp(key, "content") && strcmp(key, "name")) {
                snprintf(param, sizeof(param), "messages[%zu].%.40s", i, key);
                BAD(e, param, "unknown field '%s' (messages take role, content and name)", param);
                ok = false;
                break;
            }
        }
        if (!ok) break;
        const json_t *role = json_object_get(m, "role");
        const char *r = json_is_string(role) ? json_string_value(role) : NULL;
        if (!r) {
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            BAD(e, param, "'%s' must be a string", param);
            ok = false;
            break;
        }
        if (!strcmp(r, "developer")) r = "system";
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant")) {
            snprintf(param, sizeof(param), "messages[%zu].role", i);
            BAD(e, param, "'%s' must be system, developer, user or assistant, got '%.64s'", param,
                r);
            ok = false;
            break;
        }
        const json_t *name = json_object_get(m, "name");
        if (name && !json_is_null(name) && !json_is_string(name)) {
            snprintf(param, sizeof(param), "messages[%zu].name", i);
            BAD(e, param, "'%s' must be a string", param);
            ok = false;
            break;
        }
        if (!message_content(json_object_get(m, "content"), i, &contents[i], e)) {
            if (!e->status) api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
            ok = false;
            break;
        }
        msgs[i].role = r;
        msgs[i].content = contents[i];
    }
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    /* control tokens such as <|im_start|> come from the template's markup
     * only: the same text inside a message stays text */
    /* continue_final_message (vLLM's name): the model goes on with the last
     * assistant message, as a router does to resume a broken stream */
    bool cont = false, gen_prompt = true;
    if (ok && (get_bool(o, "continue_final_message", &cont, e) < 0 ||
               get_bool(o, "add_generation_prompt", &gen_prompt, e) < 0))
        ok = false;
    if (ok && cont && gen_prompt && json_object_get(o, "add_generation_prompt")) {
        BAD(e, "add_generation_prompt",
            "'continue_final_message' and 'add_generation_prompt' cannot both be true");
        ok = false;
    }
    if (ok && cont && strcmp(msgs[n - 1].role, "assistant") != 0) {
        BAD(e, "continue_final_message",
            "'continue_final_message' needs an assistant message last");
        ok = false;
    }
    unsigned flags = cont ? CP_CHAT_CONTINUE_FINAL : gen_prompt ? CP_CHAT_GENERATION_PROMPT : 0u;
    cp_status st =
        ok ? cp_tokenizer_encode_chat(c->tok, msgs, n, flags, &ids, &n_ids, &text) : CP_OK;
    if (st != CP_OK) {
        if (st == CP_ERR_INVALID_ARG)
            BAD(e, "messages", "cannot tokenize the messages: %s", cp_last_error_detail());
        else
            api_set_error(e, 500, "server_error", NULL, NULL, "cannot apply the chat template: %s",
                          cp_last_error_detail());
        ok = false;
    }
    if (ok) {
        g->prompt = ids;
        g->n_prompt = (int)n_ids;
        g->prompt_text = text;
        text = NULL;
    }
    free(text);
    for (size_t i = 0; contents && i < n; i++)
        free(contents[i]);
    free(contents);
    free(msgs);
    return ok;
}

static bool parse_logprobs(const json_t *o, gen_spec *g, api_error *e) {
    g->top_logprobs = -1;
    long long n;
    if (g->kind == API_COMPLETIONS) {
        const json_t *v = json_object_get(o, "logprobs");
        if (v && json_is_boolean(v)) {
            BAD(e, "logprobs",
                "'logprobs' of /v1/completions is an integer (alternatives per token)");
            return false;
        }
        int r = get_int(o, "logprobs", 0, CP_SCHED_MAX_LOGPROBS, &n, e);
        if (r < 0) return false;
        if (r > 0) g->top_logprobs = (int)n;
        return true;
    }
    bool want = false;
    if (get_bool(o, "logprobs", &want, e) < 0) return false;
    int r = get_int(o, "top_logprobs", 0, CP_SCHED_MAX_LOGPROBS, &n, e);
    if (r < 0) return false;
    if (r > 0 && !want) {
        BAD(e, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
        return false;
    }
    if (want) g->top_logprobs = r > 0 ? (int)n : 0;
    return true;
}

static bool parse_stream(const json_t *o, gen_spec *g, api_error *e) {
    if (get_bool(o, "stream", &g->stream, e) < 0) return false;
    const json_t *so = json_object_get(o, "stream_options");
    if (!so || json_is_null(so)) return true;
    if (!json_is_object(so)) {
        BAD(e, "stream_options", "'stream_options' must be an object, got %s", type_name(so));
        return false;
    }
    if (!g->stream) {
        BAD(e, "stream_options", "'stream_options' is only allowed with 'stream': true");
        return false;
    }
    const char *key;
    const json_t *val;
    json_object_foreach((json_t *)so, key, val) {
        if (strcmp(key, "include_usage") != 0 && strcmp(key, "continuous_usage_stats") != 0) {
            char param[64];
            snprintf(param, sizeof(param), "stream_options.%.40s", key);
            BAD(e, param, "unknown field '%s'", param);
            return false;
        }
    }
    if (get_bool(so, "include_usage", &g->include_usage, e) < 0) {
        snprintf(e->param, sizeof(e->param), "stream_options.include_usage");
        return false;
    }
    if (get_bool(so, "continuous_usage_stats", &g->continuous_usage, e) < 0) {
        snprintf(e->param, sizeof(e->param), "stream_options.continuous_usage_stats");
        return false;
    }
    return true;
}

bool api_parse(const api_ctx *c, api_kind k, const char *body, size_t len, gen_spec *g,
               api_error *e) {
    memset(g, 0, sizeof(*g));
    memset(e, 0, sizeof(*e));
    g->kind = k;
    g->top_logprobs = -1;
    json_error_t je;
    json_t *o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!o) {
        BAD(e, NULL, "the body is not valid JSON (line %d, column %d): %s", je.line, je.column,
            je.text);
        return false;
    }
    bool ok = false;
    if (!json_is_object(o)) {
        BAD(e, NULL, "the body must be a JSON object, got %s", type_name(o));
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(o, key, val) {
        if (!known_field(key, k)) {
            char param[96];
            snprintf(param, sizeof(param), "%.80s", key);
            BAD(e, param, "unknown field '%s'", param);
            goto out;
        }
    }
    const json_t *model = json_object_get(o, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) {
            BAD(e, "model", "'model' must be a string, got %s", type_name(model));
            goto out;
        }
        if (strcmp(json_string_value(model), c->model_name) != 0) {
            api_set_error(e, 404, "invalid_request_error", "model", "model_not_found",
                          "the model '%.200s' does not exist; this server serves '%.200s'",
                          json_string_value(model), c->model_name);
            goto out;
        }
    }
    if (!check_neutral(o, e)) goto out;
    double d;
    g->sample = (cp_sample_params){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f};
    int r = get_num(o, "temperature", 0.0, 2.0, &d, e);
    if (r < 0) goto out;
    if (r > 0) g->sample.temperature = (float)d;
    r = get_num(o, "top_p", 0.0, 1.0, &d, e);
    if (r < 0) goto out;
    if (r > 0) g->sample.top_p = (float)d;
    r = get_num(o, "min_p", 0.0, 1.0, &d, e);
    if (r < 0) goto out;
    if (r > 0) g->sample.min_p = (float)d;
    long long n;
    r = get_int(o, "top_k", -1, 1 << 24, &n, e);
    if (r < 0) goto out;
    if (r > 0) g->sample.top_k = n < 0 ? 0 : (int)n;
    r = get_int(o, "seed", INT64_MIN, INT64_MAX, &n, e);
    if (r < 0) goto out;
    if (r > 0) {
        g->seed = (uint64_t)n;
        g->seed_given = true;
    }
    if (get_bool(o, "ignore_eos", &g->ignore_eos, e) < 0) goto out;
    if (!parse_stop(o, g, e) || !parse_logprobs(o, g, e) || !parse_stream(o, g, e)) goto out;
    long long max_tokens = 0;
    const char *mt_key = "max_tokens";
    r = get_int(o, "max_tokens", 1, INT32_MAX, &max_tokens, e);
    if (r == 0 && k == API_CHAT) {
        mt_key = "max_completion_tokens";
        r = get_int(o, mt_key, 1, INT32_MAX, &max_tokens, e);
    }
    if (r < 0) goto out;
    if (r > 0 && max_tokens > c->max_tokens_limit) {
        BAD(e, mt_key, "'%s' is %lld but this server allows at most %d", mt_key, max_tokens,
            c->max_tokens_limit);
        goto out;
    }
    /* the prompt last: tokenizing is the expensive part */
    if (!(k == API_CHAT ? parse_messages(c, o, g, e) : parse_prompt(c, o, g, e))) goto out;
    const char *what = k == API_CHAT ? "messages" : "prompt";
    if (g->n_prompt <= 0) {
        BAD(e, what, "the %s is empty (no tokens)", what);
        goto out;
    }
    if (g->n_prompt >= c->n_ctx) {
        api_set_error(e, 400, "invalid_request_error", what, "context_length_exceeded",
                      "this model's context holds %d tokens, but the %s has %d tokens; shorten it",
                      c->n_ctx, what, g->n_prompt);
        goto out;
    }
    int room = c->n_ctx - g->n_prompt;
    if (r > 0) {
        if (max_tokens > room) {
            api_set_error(
                e, 400, "invalid_request_error", mt_key, "context_length_exceeded",
                "this model's context holds %d tokens, but %lld were requested (%d in the "
                "%s, %lld in the completion); reduce the %s or '%s'",
                c->n_ctx, g->n_prompt + max_tokens, g->n_prompt, what, max_tokens, what, mt_key);
            goto out;
        }
        g->max_tokens = (int)max_tokens;
    } else {
        int def = k == API_CHAT ? room : 16;
        if (def > room) def = room;
        if (def > c->max_tokens_limit) def = c->max_tokens_limit;
        g->max_tokens = def;
    }
    ok = true;
out:
    json_decref(o);
    if (!ok) gen_spec_free(g);
    return ok;
}

/* ---- logprobs ---------------------------------------------------------------- */

void lp_append(lp_list *l, int n, const int32_t *tokens, const cp_sched_logprob *chosen,
               const cp_sched_logprob *top) {
    if (n <= 0 || !tokens) return;
    if (l->n + n > l->cap) {
        int cap = l->cap ? l->cap : 16;
        while (cap < l->n + n)
            cap *= 2;
        int32_t *t = realloc(l->tokens, (size_t)cap * sizeof(int32_t));
        if (t) l->tokens = t;
        cp_sched_logprob *c = realloc(l->chosen, (size_t)cap * sizeof(*c));
        if (c) l->chosen = c;
        cp_sched_logprob *p =
            l->k ? realloc(l->top, (size_t)cap * (size_t)l->k * sizeof(*p)) : NULL;
        if (p) l->top = p;
        if (!t || !c || (l->k && !p)) return;
        l->cap = cap;
    }
    memcpy(l->tokens + l->n, tokens, (size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++)
        l->chosen[l->n + i] = chosen ? chosen[i] : (cp_sched_logprob){tokens[i], 0.0f};
    if (l->k) {
        size_t sz = (size_t)n * (size_t)l->k;
        if (top)
            memcpy(l->top + (size_t)l->n * (size_t)l->k, top, sz * sizeof(*top));
        else
            memset(l->top + (size_t)l->n * (size_t)l->k, 0, sz * sizeof(*top));
    }
    l->n += n;
}

void lp_free(lp_list *l) {
    free(l->tokens);
    free(l->chosen);
    free(l->top);
    memset(l, 0, sizeof(*l));
}

static json_t *lp_value(float v) {
    /* JSON has no infinity; OpenAI writes -9999 for impossible tokens */
    return json_real(isfinite(v) ? (double)v : -9999.0);
}

static void piece(const api_ctx *c, int32_t id, const char **s, size_t *n) {
    if (cp_tokenizer_piece(c->tok, id, true, s, n) != CP_OK) {
        *s = "";
        *n = 0;
    }
}

static json_t *bytes_array(const char *s, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_integer((unsigned char)s[i]));
    return a;
}

/* {"tokens", "token_logprobs", "top_logprobs", "text_offset"} of /v1/completions */
static json_t *completion_logprobs(const api_ctx *c, const lp_list *l, size_t offset) {
    json_t *toks = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    for (int i = 0; i < l->n; i++) {
        const char *s;
        size_t n;
        piece(c, l->tokens[i], &s, &n);
        json_array_append_new(toks, json_text(s, n));
        json_array_append_new(lps, lp_value(l->chosen[i].logprob));
        json_array_append_new(offs, json_integer((json_int_t)offset));
        offset += n;
        if (l->k > 0) {
            json_t *d = json_object();
            for (int j = 0; j < l->k; j++) {
                const cp_sched_logprob *t = &l->top[(size_t)i * (size_t)l->k + (size_t)j];
                const char *ts;
                size_t tn;
                piece(c, t->token, &ts, &tn);
                json_t *key = json_text(ts, tn);
                if (!json_object_get(d, json_string_value(key)))
                    json_object_set_new(d, json_string_value(key), lp_value(t->logprob));
                json_decref(key);
            }
            json_array_append_new(tops, d);
        }
    }
    json_t *o = json_object();
    json_object_set_new(o, "tokens", toks);
    json_object_set_new(o, "token_logprobs", lps);
    if (l->k > 0)
        json_object_set_new(o, "top_logprobs", tops);
    else {
        json_decref(tops);
        json_object_set_new(o, "top_logprobs", json_null());
    }
    json_object_set_new(o, "text_offset", offs);
    return o;
}

/* {"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null} of chat */
static json_t *chat_logprobs(const api_ctx *c, const lp_list *l) {
    json_t *content = json_array();
    for (int i = 0; i < l->n; i++) {
        const char *s;
        size_t n;
        piece(c, l->tokens[i], &s, &n);
        json_t *item = json_object();
        json_object_set_new(item, "token", json_text(s, n));
        json_object_set_new(item, "logprob", lp_value(l->chosen[i].logprob));
        json_object_set_new(item, "bytes", bytes_array(s, n));
        json_t *tops = json_array();
        for (int j = 0; j < l->k; j++) {
            const cp_sched_logprob *t = &l->top[(size_t)i * (size_t)l->k + (size_t)j];
            const char *ts;
            size_t tn;
            piece(c, t->token, &ts, &tn);
            json_t *alt = json_object();
            json_object_set_new(alt, "token", json_text(ts, tn));
            json_object_set_new(alt, "logprob", lp_value(t->logprob));
            json_object_set_new(alt, "bytes", bytes_array(ts, tn));
            json_array_append_new(tops, alt);
        }
        json_object_set_new(item, "top_logprobs", tops);
        json_array_append_new(content, item);
    }
    json_t *o = json_object();
    json_object_set_new(o, "content", content);
    json_object_set_new(o, "refusal", json_null());
    return o;
}

/* ---- responses -------------------------------------------------------------- */

static const char *finish_str(cp_finish_reason f) {
    switch (f) {
    case CP_FINISH_STOP: return "stop";
    case CP_FINISH_LENGTH: return "length";
    case CP_FINISH_CANCELLED: return "abort";
    case CP_FINISH_ERROR: return "error";
    default: return NULL;
    }
}

static json_t *usage(int n_prompt, int n_generated, int n_cached) {
    json_t *u = json_object();
    json_object_set_new(u, "prompt_tokens", json_integer(n_prompt));
    json_object_set_new(u, "completion_tokens", json_integer(n_generated));
    json_object_set_new(u, "total_tokens", json_integer(n_prompt + n_generated));
    json_t *details = json_object();
    json_object_set_new(details, "cached_tokens", json_integer(n_cached));
    json_object_set_new(u, "prompt_tokens_details", details);
    return u;
}

static json_t *envelope(const api_ctx *c, const char *object, const char *id, long created) {
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(id));
    json_object_set_new(o, "object", json_string(object));
    json_object_set_new(o, "created", json_integer(created));
    json_object_set_new(o, "model", json_text(c->model_name, strlen(c->model_name)));
    return o;
}

static char *dump(json_t *o) {
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

char *api_response(const api_ctx *c, api_kind k, const char *id, long created,
                   const gen_result *r) {
    json_t *o = envelope(c, k == API_CHAT ? "chat.completion" : "text_completion", id, created);
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    if (k == API_CHAT) {
        json_t *msg = json_object();
        json_object_set_new(msg, "role", json_string("assistant"));
        json_object_set_new(msg, "content", json_text(r->text ? r->text : "", r->len));
        json_object_set_new(choice, "message", msg);
        json_object_set_new(choice, "logprobs", r->lp ? chat_logprobs(c, r->lp) : json_null());
    } else {
        json_object_set_new(choice, "text", json_text(r->text ? r->text : "", r->len));
        json_object_set_new(choice, "logprobs",
                            r->lp ? completion_logprobs(c, r->lp, 0) : json_null());
    }
    const char *f = finish_str(r->finish);
    json_object_set_new(choice, "finish_reason", f ? json_string(f) : json_null());
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_object_set_new(o, "choices", choices);
    json_object_set_new(o, "usage", usage(r->n_prompt, r->n_generated, r->n_cached));
    if (k == API_CHAT) json_object_set_new(o, "system_fingerprint", json_null());
    return dump(o);
}

char *api_chunk(const api_ctx *c, api_kind k, const char *id, long created, const chunk_args *a) {
    json_t *o =
        envelope(c, k == API_CHAT ? "chat.completion.chunk" : "text_completion", id, created);
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    if (k == API_CHAT) {
        json_t *delta = json_object();
        if (a->role_only) {
            json_object_set_new(delta, "role", json_string("assistant"));
            json_object_set_new(delta, "content", json_string(""));
        } else if (a->len || a->lp || a->finish == CP_FINISH_NONE) {
            json_object_set_new(delta, "content", json_text(a->text ? a->text : "", a->len));
        }
        json_object_set_new(choice, "delta", delta);
        json_object_set_new(choice, "logprobs", a->lp ? chat_logprobs(c, a->lp) : json_null());
    } else {
        json_object_set_new(choice, "text", json_text(a->text ? a->text : "", a->len));
        json_object_set_new(choice, "logprobs",
                            a->lp ? completion_logprobs(c, a->lp, a->text_offset) : json_null());
    }
    const char *f = finish_str(a->finish);
    json_object_set_new(choice, "finish_reason", f ? json_string(f) : json_null());
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_object_set_new(o, "choices", choices);
    if (k == API_CHAT) json_object_set_new(o, "system_fingerprint", json_null());
    if (a->usage_now)
        json_object_set_new(o, "usage", usage(a->n_prompt, a->n_generated, a->n_cached));
    else if (a->usage_null)
        json_object_set_new(o, "usage", json_null());
    return dump(o);
}

char *api_usage_chunk(const api_ctx *c, api_kind k, const char *id, long created, int n_prompt,
                      int n_generated, int n_cached) {
    json_t *o =
        envelope(c, k == API_CHAT ? "chat.completion.chunk" : "text_completion", id, created);
    json_object_set_new(o, "choices", json_array());
    if (k == API_CHAT) json_object_set_new(o, "system_fingerprint", json_null());
    json_object_set_new(o, "usage", usage(n_prompt, n_generated, n_cached));
    return dump(o);
}

static json_t *model_object(const api_ctx *c, long created) {
    json_t *m = json_object();
    json_object_set_new(m, "id", json_text(c->model_name, strlen(c->model_name)));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer(created));
    json_object_set_new(m, "owned_by", json_string("cparallel"));
    json_object_set_new(m, "max_model_len", json_integer(c->n_ctx));
    return m;
}

char *api_health(const char *state, const char *region) {
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "status", json_string(state));
    json_object_set_new(o, "region", region ? json_text(region, strlen(region)) : json_null());
    return dump(o);
}

char *api_models(const api_ctx *c, long created) {
    json_t *o = json_object();
    json_object_set_new(o, "object", json_string("list"));
    json_t *data = json_array();
    json_array_append_new(data, model_object(c, created));
    json_object_set_new(o, "data", data);
    return dump(o);
}

char *api_model(const api_ctx *c, long created) {
    return dump(model_object(c, created));
}
