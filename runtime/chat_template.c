/* chat_template.c - formats chat messages the way a model's Jinja chat
 * template would, without a Jinja engine: the format is recognised from
 * marker strings in the template text (ChatML, Llama 3, Llama 2, Mistral,
 * Gemma, Phi-3, Zephyr) and written by hand-coded rules. */
#include <stdlib.h>
#include <string.h>

#include "cp_tokenizer.h"

typedef enum chat_fmt {
    FMT_CHATML,
    FMT_LLAMA3,
    FMT_LLAMA2,
    FMT_MISTRAL,
    FMT_GEMMA,
    FMT_PHI3,
    FMT_ZEPHYR,
} chat_fmt;

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
    cp_text_span *spans; /* where message contents landed (not markup) */
    size_t n_spans, cap_spans;
} sbuf;

static void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_str(sbuf *b, const char *s) {
    sb_add(b, s, strlen(s));
}

/* Records text[from, b->n) as message content: control-token text inside it
 * is tokenized as plain text, never as control tokens. */
static void sb_mark(sbuf *b, size_t from) {
    if (b->oom || b->n == from) return;
    if (b->n_spans && b->spans[b->n_spans - 1].off + b->spans[b->n_spans - 1].len == from) {
        b->spans[b->n_spans - 1].len += b->n - from;
        return;
    }
    if (b->n_spans == b->cap_spans) {
        size_t cap = b->cap_spans ? 2 * b->cap_spans : 16;
        cp_text_span *p = realloc(b->spans, cap * sizeof(*p));
        if (!p) {
            b->oom = true;
            return;
        }
        b->spans = p;
        b->cap_spans = cap;
    }
    b->spans[b->n_spans++] = (cp_text_span){from, b->n - from};
}

/* Drops the parts of content spans beyond the text's end (after trimming). */
static void clamp_spans(sbuf *b) {
    while (b->n_spans && b->spans[b->n_spans - 1].off >= b->n)
        b->n_spans--;
    if (b->n_spans) {
        cp_text_span *l = &b->spans[b->n_spans - 1];
        if (l->off + l->len > b->n) l->len = b->n - l->off;
    }
}

/* Appends message content (user-controlled text). */
static void sb_content(sbuf *b, const char *s) {
    size_t from = b->n;
    sb_str(b, s);
    sb_mark(b, from);
}

static bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Appends message content s without leading and trailing white space
 * (Jinja's trim). */
static void sb_trimmed(sbuf *b, const char *s) {
    size_t n = strlen(s), a = 0;
    while (a < n && is_space(s[a]))
        a++;
    while (n > a && is_space(s[n - 1]))
        n--;
    size_t from = b->n;
    sb_add(b, s + a, n - a);
    sb_mark(b, from);
}

static chat_fmt detect(const char *t) {
    if (!t || !*t) return FMT_CHATML;
    if (strstr(t, "<|im_start|>")) return FMT_CHATML;
    if (strstr(t, "<|start_header_id|>")) return FMT_LLAMA3;
    if (strstr(t, "<start_of_turn>")) return FMT_GEMMA;
    /* Phi-3 templates may build "<|user|>" from the role: key on <|end|> */
    if (strstr(t, "<|end|>") && strstr(t, "<|assistant|>")) return FMT_PHI3;
    if (strstr(t, "<|user|>")) return FMT_ZEPHYR;
    if (strstr(t, "[INST]")) return strstr(t, "<<SYS>>") ? FMT_LLAMA2 : FMT_MISTRAL;
    return FMT_CHATML;
}

/* The default system message a ChatML template writes when the conversation
 * has none, e.g. SmolLM2's
 *   {{ '<|im_start|>system\nYou are a helpful AI assistant ...<|im_end|>\n' }}
 * Only a literal string qualifies: the text between "<|im_start|>system" +
 * newline and "<|im_end|>" must lie inside one quoted Jinja string (its
 * escapes are decoded). Returns a malloc'd string, or NULL when none. */
static char *chatml_default_system(const char *t) {
    static const char open[] = "<|im_start|>system";
    if (!t) return NULL;
    for (const char *p = strstr(t, open); p; p = strstr(p + 1, open)) {
        if (p == t || (p[-1] != '\'' && p[-1] != '"')) continue;
        char quote = p[-1];
        const char *s = p + sizeof(open) - 1;
        if (s[0] == '\n')
            s += 1;
        else if (s[0] == '\\' && s[1] == 'n')
            s += 2;
        else
            continue;
        sbuf b = {0};
        bool ok = false;
        while (*s) {
            if (strncmp(s, "<|im_end|>", 10) == 0) {
                ok = true;
                break;
            }
            if (*s == quote) break; /* the literal ends: the text is computed */
            if (*s == '\\' && s[1]) {
                char c = s[1];
                char d = c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
                sb_add(&b, &d, 1);
                s += 2;
            } else {
                sb_add(&b, s, 1);
                s++;
            }
        }
        if (ok && !b.oom && b.n > 0) return b.p;
        free(b.p);
    }
    return NULL;
}

static void chatml(sbuf *b, const char *tmpl, const cp_chat_msg *m, size_t n, bool gen,
                   bool default_system) {
    if (default_system && (n == 0 || strcmp(m[0].role, "system") != 0)) {
        char *sys = chatml_default_system(tmpl);
        if (sys) {
            sb_str(b, "<|im_start|>system\n");
            sb_str(b, sys);
            sb_str(b, "<|im_end|>\n");
            free(sys);
        }
    }
    for (size_t i = 0; i < n; i++) {
        sb_str(b, "<|im_start|>");
        sb_str(b, m[i].role);
        sb_str(b, "\n");
        sb_content(b, m[i].content);
        sb_str(b, "<|im_end|>\n");
    }
    if (gen) sb_str(b, "<|im_start|>assistant\n");
}

static void llama3(sbuf *b, const cp_chat_msg *m, size_t n, bool gen) {
    for (size_t i = 0; i < n; i++) {
        sb_str(b, "<|start_header_id|>");
        sb_str(b, m[i].role);
        sb_str(b, "<|end_header_id|>\n\n");
        sb_trimmed(b, m[i].content);
        sb_str(b, "<|eot_id|>");
    }
    if (gen) sb_str(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* Llama 2 chat: the system message goes inside the first [INST] between
 * <<SYS>> markers; later user turns start with the BOS text. */
static void llama2(sbuf *b, const cp_chat_msg *m, size_t n, const char *eos) {
    const char *sys = NULL;
    size_t i = 0;
    if (n > 0 && strcmp(m[0].role, "system") == 0) sys = m[i++].content;
    bool first = true;
    for (; i < n; i++) {
        if (strcmp(m[i].role, "user") == 0) {
            sb_str(b, first ? "[INST] " : "<s>[INST] ");
            if (first && sys) {
                sb_str(b, "<<SYS>>\n");
                sb_content(b, sys);
                sb_str(b, "\n<</SYS>>\n\n");
                sb_content(b, m[i].content);
                /* Jinja strips the combined text: only its tail can change */
                while (b->n > 0 && is_space(b->p[b->n - 1]))
                    b->p[--b->n] = '\0';
                clamp_spans(b);
            } else {
                sb_trimmed(b, m[i].content);
            }
            sb_str(b, " [/INST]");
        } else if (strcmp(m[i].role, "assistant") == 0) {
            sb_str(b, " ");
            sb_trimmed(b, m[i].content);
            sb_str(b, " ");
            sb_str(b, eos);
        }
        first = false;
    }
}

/* Mistral instruct: no system role; a system message is prepended to the
 * first user message. */
static void mistral(sbuf *b, const cp_chat_msg *m, size_t n, const char *eos) {
    const char *sys = NULL;
    size_t i = 0;
    if (n > 0 && strcmp(m[0].role, "system") == 0) sys = m[i++].content;
    for (; i < n; i++) {
        if (strcmp(m[i].role, "user") == 0) {
            sb_str(b, "[INST] ");
            if (sys) {
                sb_content(b, sys);
                sb_str(b, "\n\n");
                sys = NULL;
            }
            sb_content(b, m[i].content);
            sb_str(b, " [/INST]");
        } else if (strcmp(m[i].role, "assistant") == 0) {
            sb_content(b, m[i].content);
            sb_str(b, eos);
        }
    }
}

static void gemma(sbuf *b, const cp_chat_msg *m, size_t n, bool gen) {
    const char *sys = NULL;
    size_t i = 0;
    if (n > 0 && strcmp(m[0].role, "system") == 0) sys = m[i++].content;
    for (; i < n; i++) {
        bool asst = strcmp(m[i].role, "assistant") == 0;
        sb_str(b, "<start_of_turn>");
        sb_str(b, asst ? "model" : m[i].role);
        sb_str(b, "\n");
        if (sys && !asst) {
            sb_trimmed(b, sys);
            sb_str(b, "\n\n");
            sys = NULL;
        }
        sb_trimmed(b, m[i].content);
        sb_str(b, "<end_of_turn>\n");
    }
    if (gen) sb_str(b, "<start_of_turn>model\n");
}

/* Phi-3 (<|end|>) and Zephyr (EOS) share the "<|role|>\n" turn header. */
static void role_tags(sbuf *b, const cp_chat_msg *m, size_t n, bool gen, const char *end) {
    for (size_t i = 0; i < n; i++) {
        sb_str(b, "<|");
        sb_str(b, m[i].role);
        sb_str(b, "|>\n");
        sb_content(b, m[i].content);
        sb_str(b, end);
        sb_str(b, "\n");
    }
    if (gen) sb_str(b, "<|assistant|>\n");
}

cp_status cp_chat_format_spans(const char *tmpl, const char *eos_text, const cp_chat_msg *msgs,
                               size_t n, unsigned flags, char **out, cp_text_span **content,
                               size_t *n_content) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_chat_format: out is NULL");
    *out = NULL;
    if (content) *content = NULL;
    if (n_content) *n_content = 0;
    if (n && !msgs)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_chat_format: %zu messages but msgs is NULL", n);
    for (size_t i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content)
            return CP_ERROR(CP_ERR_INVALID_ARG, "chat message %zu has no %s", i,
                            msgs[i].role ? "content" : "role");
    const char *eos = eos_text ? eos_text : "</s>";
    /* continuing: the final assistant message is written with a marker as
     * its content, the text is cut where the marker lands (so the turn stays
     * open: no end-of-turn markup) and the content follows verbatim */
    static const char marker[] = "\x01cparallel-continue\x01";
    const bool cont = (flags & CP_CHAT_CONTINUE_FINAL) != 0;
    cp_chat_msg *copy = NULL;
    const char *final_content = NULL;
    if (cont) {
        if (n == 0 || strcmp(msgs[n - 1].role, "assistant") != 0)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "continuing the final message needs an assistant message last");
        for (size_t i = 0; i < n; i++)
            if (strstr(msgs[i].content, marker))
                return CP_ERROR(CP_ERR_INVALID_ARG, "chat message %zu holds a reserved marker", i);
        if (!(copy = malloc(n * sizeof(*copy))))
            return CP_ERROR(CP_ERR_OOM, "out of memory formatting %zu chat messages", n);
        memcpy(copy, msgs, n * sizeof(*copy));
        final_content = msgs[n - 1].content;
        copy[n - 1].content = marker;
        msgs = copy;
    }
    const bool add_generation_prompt =
        !cont && (flags & CP_CHAT_GENERATION_PROMPT) != 0;
    sbuf b = {0};
    sb_add(&b, "", 0); /* an empty conversation still yields "" */
    switch (detect(tmpl)) {
    case FMT_CHATML:
        chatml(&b, tmpl, msgs, n, add_generation_prompt, (flags & CP_CHAT_TEMPLATE_SYSTEM) != 0);
        break;
    case FMT_LLAMA3: llama3(&b, msgs, n, add_generation_prompt); break;
    case FMT_LLAMA2: llama2(&b, msgs, n, eos); break;
    case FMT_MISTRAL: mistral(&b, msgs, n, eos); break;
    case FMT_GEMMA: gemma(&b, msgs, n, add_generation_prompt); break;
    case FMT_PHI3: role_tags(&b, msgs, n, add_generation_prompt, "<|end|>"); break;
    case FMT_ZEPHYR: role_tags(&b, msgs, n, add_generation_prompt, eos); break;
    }
    if (cont) {
        const char *at = NULL;
        for (const char *p = b.p ? strstr(b.p, marker) : NULL; p; p = strstr(p + 1, marker))
            at = p;
        free(copy);
        if (!at && !b.oom) {
            free(b.p);
            free(b.spans);
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "this chat format cannot continue the final assistant message");
        }
        if (at) {
            b.n = (size_t)(at - b.p);
            b.p[b.n] = '\0';
            clamp_spans(&b);
            sb_content(&b, final_content);
        }
    }
    if (b.oom) {
        free(b.p);
        free(b.spans);
        return CP_ERROR(CP_ERR_OOM, "out of memory formatting %zu chat messages", n);
    }
    *out = b.p;
    if (content && n_content) {
        *content = b.spans;
        *n_content = b.n_spans;
    } else {
        free(b.spans);
    }
    return CP_OK;
}

cp_status cp_chat_format(const char *tmpl, const char *eos_text, const cp_chat_msg *msgs, size_t n,
                         unsigned flags, char **out) {
    return cp_chat_format_spans(tmpl, eos_text, msgs, n, flags, out, NULL, NULL);
}
