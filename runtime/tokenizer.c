/* tokenizer.c - byte-level BPE (GPT-2 style) and SentencePiece BPE encoding
 * and decoding, special-token partitioning, the hand-written pre-tokenizer
 * matchers (one per GGUF "pre" type, no regex library) and the GGUF glue.
 * Merging uses a binary heap of candidate pairs over a linked list of
 * symbols, so a word of n bytes costs O(n log n). */
#include "cp_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode.h"

enum { MODEL_BPE = 1, MODEL_SPM = 2 };

/* Pre-tokenizer stages; a pre type runs a list of them, each splitting every
 * piece the previous one produced (llama.cpp applies its regex list the same
 * way, and so does a Hugging Face Sequence pre-tokenizer). */
typedef enum stage {
    ST_END = 0,
    ST_DIGIT1,    /* \p{N}                 each number character alone */
    ST_NRUN,      /* \p{N}+ */
    ST_DIGIT3,    /* [0-9][0-9][0-9] */
    ST_PUNCT_RUN, /* [\p{P}\$\+<=>\^~\|]+ */
    ST_GPT2,      /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    ST_LLAMA3,    /* (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
                     ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
    ST_QWEN2,     /* the same with \p{N} instead of \p{N}{1,3} */
} stage;

#define MAX_STAGES 5

typedef struct pre_def {
    const char *names[8];
    stage stages[MAX_STAGES];
    bool ignore_merges; /* a whole word found in the vocabulary skips the merges */
} pre_def;

static const pre_def PRE_DEFS[] = {
    {{"default"}, {ST_PUNCT_RUN, ST_GPT2, ST_NRUN, ST_DIGIT3}, false},
    {{"gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "trillion"}, {ST_GPT2}, false},
    {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"},
     {ST_DIGIT1, ST_GPT2},
     false},
    {{"llama3", "llama-bpe", "llama-v3", "falcon3"}, {ST_LLAMA3}, true},
    {{"dbrx", "smaug-bpe"}, {ST_LLAMA3}, false},
    {{"qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan"}, {ST_QWEN2}, false},
};

/* Texts of control tokens that end a generation whatever the model's eos. */
static const char *const EOG_TEXTS[] = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<|eom_id|>",
    /* DeepSeek's <｜end▁of▁sentence｜>; split so "\x9c" does not swallow "e" */
    ("<\xef\xbd\x9c"
     "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"),
};

enum { TF_EOG = 1 };

typedef struct merge_slot {
    uint64_t key; /* (left << 32 | right) + 1; 0 = empty */
    int32_t rank;
    int32_t result;
} merge_slot;

struct cp_tokenizer {
    int model;
    const pre_def *pre;
    bool ignore_merges;
    bool use_ranks; /* merge by rank (merges given) rather than by score */
    int32_t n_vocab;
    char *text;          /* arena: every token's text */
    uint64_t *text_off;  /* n_vocab + 1 offsets into text */
    char *piece;         /* arena: every token's decoded bytes */
    uint64_t *piece_off; /* n_vocab + 1 offsets into piece */
    float *scores;       /* n_vocab, or NULL */
    uint8_t *types;      /* n_vocab cp_token_type */
    uint8_t *tflags;     /* n_vocab TF_* bits */
    int32_t *tok_tab;    /* open-addressing text -> id, -1 = empty */
    uint64_t tok_mask;
    merge_slot *merge_tab;
    uint64_t merge_mask;
    int32_t byte_tok[256];     /* BPE: token of the byte's mapped char; SPM: <0xAB> */
    char byte_map[256][2];     /* BPE: UTF-8 (1-2 bytes) of the byte's mapped char */
    uint8_t byte_map_len[256]; /* its length */
    int32_t bos, eos, unk, pad, eot;
    bool add_bos, add_eos, add_space_prefix;
    int32_t *special; /* partition candidates, longest text first */
    size_t n_special;
    char *chat_template;
};

/* ---- small helpers ----------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static uint64_t pow2_at_least(uint64_t n) {
    uint64_t c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

static const char *tok_text(const struct cp_tokenizer *t, int32_t id, size_t *len) {
    *len = (size_t)(t->text_off[id + 1] - t->text_off[id]);
    return t->text + t->text_off[id];
}

static int32_t lookup(const struct cp_tokenizer *t, const char *s, size_t n) {
    if (n == 0) return -1;
    uint64_t i = hash_bytes(s, n) & t->tok_mask;
    for (;;) {
        int32_t id = t->tok_tab[i];
        if (id < 0) return -1;
        size_t l;
        const char *x = tok_text(t, id, &l);
        if (l == n && memcmp(x, s, n) == 0) return id;
        i = (i + 1) & t->tok_mask;
    }
}

static const merge_slot *find_merge(const struct cp_tokenizer *t, int32_t a, int32_t b) {
    if (!t->merge_tab) return NULL;
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint64_t i = hash_u64(key) & t->merge_mask;
    for (;;) {
        const merge_slot *s = &t->merge_tab[i];
        if (s->key == 0) return NULL;
        if (s->key == key) return s;
        i = (i + 1) & t->merge_mask;
    }
}

static bool is_partition_type(uint8_t ty) {
    return ty == CP_TOKEN_CONTROL || ty == CP_TOKEN_USER_DEFINED || ty == CP_TOKEN_UNKNOWN;
}

/* Types a SentencePiece merge may produce (sentencepiece only merges into
 * normal and user-defined pieces; never into <s>, <unk> or <0xAB>). */
static bool is_mergeable_type(uint8_t ty) {
    return ty == CP_TOKEN_NORMAL || ty == CP_TOKEN_UNDEFINED || ty == CP_TOKEN_USER_DEFINED;
}

/* GPT-2's reversible byte <-> printable code point map. */
static uint32_t gpt2_byte_to_cp(int b) {
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))
        return (uint32_t)b;
    int n = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) n++;
    return 256u + (uint32_t)n;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* "<0xAB>" -> 0xAB, else -1. */
static int parse_byte_token(const char *s, size_t n) {
    if (n != 6 || s[0] != '<' || s[1] != '0' || s[2] != 'x' || s[5] != '>') return -1;
    int hi = hexval(s[3]), lo = hexval(s[4]);
    if (hi < 0 || lo < 0) return -1;
    return hi * 16 + lo;
}

/* ---- growable buffers -------------------------------------------------- */

typedef struct ivec {
    int32_t *v;
    size_t n, cap;
} ivec;

static cp_status ivec_push(ivec *a, int32_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = realloc(a->v, cap * sizeof(*v));
        if (!v) return CP_ERROR(CP_ERR_OOM, "out of memory growing the token list to %zu ids", cap);
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return CP_OK;
}

static cp_status grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return CP_OK;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q)
        return CP_ERROR(CP_ERR_OOM, "out of memory allocating %zu bytes of tokenizer scratch",
                        c * elem);
    *p = q;
    *cap = c;
    return CP_OK;
}

/* ---- init ---------------------------------------------------------------- */

static const pre_def *find_pre(const char *name) {
    if (!name || !*name) name = "default";
    for (size_t i = 0; i < sizeof(PRE_DEFS) / sizeof(PRE_DEFS[0]); i++)
        for (size_t j = 0; j < 8 && PRE_DEFS[i].names[j]; j++)
            if (strcmp(PRE_DEFS[i].names[j], name) == 0) return &PRE_DEFS[i];
    return NULL;
}

/* qsort has no context argument in C11: sort (length, id) pairs instead. */
typedef struct len_id {
    uint64_t len;
    int32_t id;
} len_id;

static int cmp_len_id(const void *pa, const void *pb) {
    const len_id *a = pa, *b = pb;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

static cp_status check_id(const char *what, int32_t id, int64_t n) {
    if (id < -1 || id >= n)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "tokenizer %s id %d is outside the vocabulary (0..%lld)", what, (int)id,
                        (long long)n - 1);
    return CP_OK;
}

static cp_status build_pieces(cp_tokenizer_t t) {
    /* A decoded piece is never longer than its text (a mapped char of 1-2
     * bytes gives 1 byte, "▁" of 3 bytes gives 1), so the text size bounds
     * the arena. */
    uint64_t total = t->text_off[t->n_vocab];
    t->piece = malloc(total + 1);
    t->piece_off = malloc(((size_t)t->n_vocab + 1) * sizeof(uint64_t));
    if (!t->piece || !t->piece_off)
        return CP_ERROR(CP_ERR_OOM, "out of memory for %llu bytes of token pieces",
                        (unsigned long long)total);
    int16_t cp_to_byte[512];
    for (int i = 0; i < 512; i++)
        cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++)
        cp_to_byte[gpt2_byte_to_cp(b)] = (int16_t)b;

    uint64_t o = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        t->piece_off[id] = o;
        size_t n;
        const char *s = tok_text(t, id, &n);
        uint8_t ty = t->types[id];
        int byte = -1;
        if (ty == CP_TOKEN_BYTE && (byte = parse_byte_token(s, n)) >= 0) {
            t->piece[o++] = (char)byte;
        } else if (ty == CP_TOKEN_CONTROL || ty == CP_TOKEN_UNKNOWN || ty == CP_TOKEN_UNUSED ||
                   (ty == CP_TOKEN_USER_DEFINED && t->model == MODEL_BPE) || ty == CP_TOKEN_BYTE) {
            memcpy(t->piece + o, s, n);
            o += n;
        } else if (t->model == MODEL_BPE) {
            size_t i = 0;
            while (i < n) {
                uint32_t cp;
                size_t k = cp_utf8_decode((const uint8_t *)s + i, n - i, &cp);
                if (k == 0) {
                    t->piece[o++] = s[i++]; /* not UTF-8: keep the byte */
                } else if (cp < 512 && cp_to_byte[cp] >= 0) {
                    t->piece[o++] = (char)cp_to_byte[cp];
                    i += k;
                } else {
                    memcpy(t->piece + o, s + i, k); /* not a mapped byte: keep the char */
                    o += k;
                    i += k;
                }
            }
        } else {
            size_t i = 0;
            while (i < n) {
                if (i + 3 <= n && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
                    t->piece[o++] = ' ';
                    i += 3;
                } else {
                    t->piece[o++] = s[i++];
                }
            }
        }
    }
    t->piece_off[t->n_vocab] = o;
    return CP_OK;
}

static cp_status build_merges(cp_tokenizer_t t, const cp_tokenizer_spec *spec) {
    t->merge_mask = pow2_at_least((uint64_t)spec->n_merges * 2 + 1) - 1;
    t->merge_tab = calloc(t->merge_mask + 1, sizeof(merge_slot));
    if (!t->merge_tab)
        return CP_ERROR(CP_ERR_OOM, "out of memory for %lld merges", (long long)spec->n_merges);
    char *buf = NULL;
    size_t cap = 0;
    cp_status st = CP_OK;
    for (int64_t r = 0; r < spec->n_merges; r++) {
        cp_str m = spec->merges[r];
        if (!m.ptr && m.len) {
            st = CP_ERROR(CP_ERR_INVALID_ARG, "tokenizer merge %lld is NULL", (long long)r);
            goto fail;
        }
        /* Split at the first space (from offset 1) whose two halves are both
         * tokens; the halves of a byte-level merge never contain a space. */
        int32_t a = -1, b = -1;
        for (size_t sp = 1; sp + 1 < m.len; sp++) {
            if (m.ptr[sp] != ' ') continue;
            a = lookup(t, m.ptr, sp);
            b = lookup(t, m.ptr + sp + 1, m.len - sp - 1);
            if (a >= 0 && b >= 0) break;
            a = b = -1;
        }
        if (a < 0) {
            st =
                CP_ERROR(CP_ERR_INVALID_ARG,
                         "tokenizer merge %lld \"%.*s\" does not name two tokens of the vocabulary",
                         (long long)r, (int)(m.len > 200 ? 200 : m.len), m.ptr ? m.ptr : "");
            goto fail;
        }
        size_t la, lb;
        const char *sa = tok_text(t, a, &la), *sb = tok_text(t, b, &lb);
        CP_CHECK_GOTO(grow((void **)&buf, &cap, la + lb, 1), st, fail);
        memcpy(buf, sa, la);
        memcpy(buf + la, sb, lb);
        int32_t res = lookup(t, buf, la + lb);
        if (res < 0) {
            st = CP_ERROR(CP_ERR_INVALID_ARG,
                          "tokenizer merge %lld \"%.*s\" produces \"%.*s\", which is not a token",
                          (long long)r, (int)(m.len > 200 ? 200 : m.len), m.ptr,
                          (int)(la + lb > 200 ? 200 : la + lb), buf);
            goto fail;
        }
        uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
        uint64_t i = hash_u64(key) & t->merge_mask;
        while (t->merge_tab[i].key != 0 && t->merge_tab[i].key != key)
            i = (i + 1) & t->merge_mask;
        if (t->merge_tab[i].key == 0) { /* a repeated pair keeps its first (lowest) rank */
            t->merge_tab[i].key = key;
            t->merge_tab[i].rank = (int32_t)r;
            t->merge_tab[i].result = res;
        }
    }
fail:
    free(buf);
    return st;
}

cp_status cp_tokenizer_init(const cp_tokenizer_spec *spec, cp_tokenizer_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_init: out is NULL");
    *out = NULL;
    if (!spec || !spec->model || !spec->tokens)
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "cp_tokenizer_init: spec, spec->model and spec->tokens are required");
    if (spec->n_vocab <= 0 || spec->n_vocab >= INT32_MAX)
        return CP_ERROR(CP_ERR_INVALID_ARG, "tokenizer vocabulary size %lld is not in 1..%d",
                        (long long)spec->n_vocab, INT32_MAX - 1);
    if (spec->n_merges < 0 || spec->n_merges >= INT32_MAX || (spec->n_merges > 0 && !spec->merges))
        return CP_ERROR(CP_ERR_INVALID_ARG, "tokenizer merges: bad count %lld or NULL array",
                        (long long)spec->n_merges);
    int model;
    if (strcmp(spec->model, "gpt2") == 0)
        model = MODEL_BPE;
    else if (strcmp(spec->model, "llama") == 0)
        model = MODEL_SPM;
    else
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "tokenizer model \"%s\" is not supported (supported: \"gpt2\" "
                        "byte-level BPE, \"llama\" SentencePiece BPE)",
                        spec->model);
    const pre_def *pre = NULL;
    if (model == MODEL_BPE) {
        pre = find_pre(spec->pre);
        if (!pre)
            return CP_ERROR(CP_ERR_UNSUPPORTED,
                            "pre-tokenizer \"%s\" is not supported (supported: default, "
                            "gpt2, smollm, starcoder, llama3/llama-bpe, qwen2 and aliases)",
                            spec->pre);
        if (spec->n_merges == 0)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "byte-level BPE tokenizer has no merges (tokenizer.ggml.merges)");
    }
    const int64_t n = spec->n_vocab;
    cp_status st;
    CP_CHECK(check_id("bos", spec->bos_id, n));
    CP_CHECK(check_id("eos", spec->eos_id, n));
    CP_CHECK(check_id("unk", spec->unk_id, n));
    CP_CHECK(check_id("pad", spec->pad_id, n));
    CP_CHECK(check_id("eot", spec->eot_id, n));
    if (spec->add_bos && spec->bos_id < 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "tokenizer asks to add BOS but has no BOS token");
    if (spec->add_eos && spec->eos_id < 0)
        return CP_ERROR(CP_ERR_INVALID_ARG, "tokenizer asks to add EOS but has no EOS token");

    cp_tokenizer_t t = calloc(1, sizeof(*t));
    if (!t) return CP_ERROR(CP_ERR_OOM, "out of memory allocating a tokenizer");
    t->model = model;
    t->pre = pre;
    t->ignore_merges = pre && pre->ignore_merges;
    t->use_ranks = spec->n_merges > 0;
    t->n_vocab = (int32_t)n;
    t->bos = spec->bos_id;
    t->eos = spec->eos_id;
    t->unk = spec->unk_id;
    t->pad = spec->pad_id;
    t->eot = spec->eot_id;
    t->add_bos = spec->add_bos;
    t->add_eos = spec->add_eos;
    t->add_space_prefix = model == MODEL_SPM && spec->add_space_prefix;

    /* texts */
    uint64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!spec->tokens[i].ptr && spec->tokens[i].len) {
            st = CP_ERROR(CP_ERR_INVALID_ARG, "token %lld has a NULL text", (long long)i);
            goto fail;
        }
        total += spec->tokens[i].len;
    }
    t->text = malloc(total + 1);
    t->text_off = malloc(((size_t)n + 1) * sizeof(uint64_t));
    t->types = malloc((size_t)n);
    t->tflags = calloc((size_t)n, 1);
    if (!t->text || !t->text_off || !t->types || !t->tflags) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for a vocabulary of %lld tokens", (long long)n);
        goto fail;
    }
    uint64_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        t->text_off[i] = o;
        if (spec->tokens[i].len) memcpy(t->text + o, spec->tokens[i].ptr, spec->tokens[i].len);
        o += spec->tokens[i].len;
    }
    t->text_off[n] = o;
    if (spec->scores) {
        t->scores = malloc((size_t)n * sizeof(float));
        if (!t->scores) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory for token scores");
            goto fail;
        }
        memcpy(t->scores, spec->scores, (size_t)n * sizeof(float));
    } else if (model == MODEL_SPM && !t->use_ranks) {
        st = CP_ERROR(
            CP_ERR_INVALID_ARG,
            "SentencePiece tokenizer needs token scores (tokenizer.ggml.scores) or merges");
        goto fail;
    }

    /* types: given, or inferred from the special ids and byte-token names */
    for (int64_t i = 0; i < n; i++) {
        if (spec->token_types) {
            int32_t ty = spec->token_types[i];
            if (ty < 0 || ty > CP_TOKEN_BYTE) {
                st = CP_ERROR(CP_ERR_INVALID_ARG, "token %lld has unknown token type %d",
                              (long long)i, (int)ty);
                goto fail;
            }
            t->types[i] = (uint8_t)ty;
        } else {
            t->types[i] = CP_TOKEN_NORMAL;
            if (model == MODEL_SPM &&
                parse_byte_token(spec->tokens[i].ptr, spec->tokens[i].len) >= 0)
                t->types[i] = CP_TOKEN_BYTE;
        }
    }
    if (!spec->token_types) {
        const int32_t ctl[] = {spec->bos_id, spec->eos_id, spec->pad_id, spec->eot_id};
        for (size_t k = 0; k < 4; k++)
            if (ctl[k] >= 0) t->types[ctl[k]] = CP_TOKEN_CONTROL;
        if (spec->unk_id >= 0) t->types[spec->unk_id] = CP_TOKEN_UNKNOWN;
    }

    /* text -> id (the last of duplicated texts wins, as in llama.cpp) */
    t->tok_mask = pow2_at_least((uint64_t)n * 2 + 1) - 1;
    t->tok_tab = malloc((t->tok_mask + 1) * sizeof(int32_t));
    if (!t->tok_tab) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for the token table");
        goto fail;
    }
    memset(t->tok_tab, 0xff, (t->tok_mask + 1) * sizeof(int32_t));
    for (int32_t id = 0; id < t->n_vocab; id++) {
        size_t l;
        const char *s = tok_text(t, id, &l);
        if (l == 0) continue;
        uint64_t i = hash_bytes(s, l) & t->tok_mask;
        for (;;) {
            int32_t cur = t->tok_tab[i];
            if (cur < 0) {
                t->tok_tab[i] = id;
                break;
            }
            size_t cl;
            const char *cs = tok_text(t, cur, &cl);
            if (cl == l && memcmp(cs, s, l) == 0) {
                t->tok_tab[i] = id;
                break;
            }
            i = (i + 1) & t->tok_mask;
        }
    }

    CP_CHECK_GOTO(build_pieces(t), st, fail);

    for (int b = 0; b < 256; b++) {
        t->byte_tok[b] = -1;
        if (model == MODEL_BPE) {
            char u[4];
            size_t k = cp_utf8_encode(gpt2_byte_to_cp(b), u);
            memcpy(t->byte_map[b], u, k);
            t->byte_map_len[b] = (uint8_t)k;
            t->byte_tok[b] = lookup(t, u, k);
        } else {
            char name[8];
            snprintf(name, sizeof(name), "<0x%02X>", b);
            int32_t id = lookup(t, name, 6);
            if (id >= 0 && t->types[id] == CP_TOKEN_BYTE) t->byte_tok[b] = id;
        }
    }

    if (t->use_ranks) CP_CHECK_GOTO(build_merges(t, spec), st, fail);

    /* special-token partition candidates, longest first */
    size_t ns = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (is_partition_type(t->types[id]) && t->text_off[id + 1] > t->text_off[id]) ns++;
    if (ns) {
        len_id *tmp = malloc(ns * sizeof(len_id));
        t->special = malloc(ns * sizeof(int32_t));
        if (!tmp || !t->special) {
            free(tmp);
            st = CP_ERROR(CP_ERR_OOM, "out of memory for special tokens");
            goto fail;
        }
        size_t k = 0;
        for (int32_t id = 0; id < t->n_vocab; id++)
            if (is_partition_type(t->types[id]) && t->text_off[id + 1] > t->text_off[id])
                tmp[k++] = (len_id){t->text_off[id + 1] - t->text_off[id], id};
        qsort(tmp, ns, sizeof(len_id), cmp_len_id);
        for (size_t i = 0; i < ns; i++)
            t->special[i] = tmp[i].id;
        t->n_special = ns;
        free(tmp);
    }

    /* end-of-generation set */
    if (t->eos >= 0) t->tflags[t->eos] |= TF_EOG;
    if (t->eot >= 0) t->tflags[t->eot] |= TF_EOG;
    for (size_t k = 0; k < sizeof(EOG_TEXTS) / sizeof(EOG_TEXTS[0]); k++) {
        int32_t id = lookup(t, EOG_TEXTS[k], strlen(EOG_TEXTS[k]));
        if (id >= 0 && (t->types[id] == CP_TOKEN_CONTROL || t->types[id] == CP_TOKEN_USER_DEFINED))
            t->tflags[id] |= TF_EOG;
    }

    if (spec->chat_template) {
        t->chat_template = strdup(spec->chat_template);
        if (!t->chat_template) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory copying the chat template");
            goto fail;
        }
    }
    *out = t;
    return CP_OK;
fail:
    cp_tokenizer_free(t);
    return st;
}

void cp_tokenizer_free(cp_tokenizer_t t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->scores);
    free(t->types);
    free(t->tflags);
    free(t->tok_tab);
    free(t->merge_tab);
    free(t->special);
    free(t->chat_template);
    free(t);
}

/* ---- pre-tokenizer matchers ------------------------------------------------
 * Each splits the piece cps[a..b) by marking cut[i] = 1 where a new piece
 * begins, exactly as the documented regex would when run on that piece alone
 * (so b acts as the end of text for look-aheads). */

#define IS_L(f) ((f)&CP_UCAT_L)
#define IS_N(f) ((f)&CP_UCAT_N)
#define IS_WS(f) ((f)&CP_UFLAG_SPACE)

static void split_class_runs(const uint8_t *fl, size_t a, size_t b, uint8_t *cut, uint8_t mask,
                             bool single) {
    size_t i = a;
    while (i < b) {
        if (fl[i] & mask) {
            cut[i] = 1;
            size_t j = i + 1;
            if (!single)
                while (j < b && (fl[j] & mask))
                    j++;
            cut[j] = 1;
            i = j;
        } else {
            i++;
        }
    }
}

static bool is_default_punct(uint32_t c, uint8_t f) {
    return (f & CP_UCAT_P) || c == '$' || c == '+' || c == '<' || c == '=' || c == '>' ||
           c == '^' || c == '~' || c == '|';
}

static void split_punct_runs(const uint32_t *cps, const uint8_t *fl, size_t a, size_t b,
                             uint8_t *cut) {
    size_t i = a;
    while (i < b) {
        if (is_default_punct(cps[i], fl[i])) {
            cut[i] = 1;
            size_t j = i + 1;
            while (j < b && is_default_punct(cps[j], fl[j]))
                j++;
            cut[j] = 1;
            i = j;
        } else {
            i++;
        }
    }
}

static void split_digit3(const uint32_t *cps, size_t a, size_t b, uint8_t *cut) {
    size_t i = a;
    while (i + 3 <= b) {
        if (cps[i] - '0' < 10 && cps[i + 1] - '0' < 10 && cps[i + 2] - '0' < 10) {
            cut[i] = 1;
            cut[i + 3] = 1;
            i += 3;
        } else {
            i++;
        }
    }
}

static uint32_t ascii_lower(uint32_t c) {
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

/* Length of a contraction 's 't 're 've 'm 'll 'd at i, or 0. */
static size_t contraction(const uint32_t *cps, size_t i, size_t b, bool fold) {
    if (cps[i] != '\'' || i + 1 >= b) return 0;
    uint32_t c1 = fold ? ascii_lower(cps[i + 1]) : cps[i + 1];
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
    if (i + 2 < b) {
        uint32_t c2 = fold ? ascii_lower(cps[i + 2]) : cps[i + 2];
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
            return 3;
    }
    return 0;
}

/* \s+(?!\S)|\s+ at i (a whitespace char): the whole run when it reaches the
 * end or is one char long, else all but its last char. */
static size_t ws_run_end(const uint8_t *fl, size_t i, size_t b) {
    size_t k = i;
    while (k < b && IS_WS(fl[k]))
        k++;
    if (k < b && k - i >= 2) k--;
    return k;
}

static void split_gpt2(const uint32_t *cps, const uint8_t *fl, size_t a, size_t b, uint8_t *cut) {
    size_t i = a;
    while (i < b) {
        cut[i] = 1;
        size_t k = contraction(cps, i, b, false);
        if (k) {
            i += k;
            continue;
        }
        size_t j = i + (cps[i] == ' ' ? 1 : 0);
        if (j < b) {
            uint8_t f = fl[j];
            if (IS_L(f) || IS_N(f)) {
                uint8_t cls = IS_L(f) ? CP_UCAT_L : CP_UCAT_N;
                while (j < b && (fl[j] & cls))
                    j++;
                i = j;
                continue;
            }
            if (!IS_WS(f)) {
                while (j < b && !(fl[j] & (CP_UFLAG_SPACE | CP_UCAT_L | CP_UCAT_N)))
                    j++;
                i = j;
                continue;
            }
        }
        /* cps[i] is whitespace here: a ' ' followed by whitespace or the end,
         * or another white-space char. */
        i = ws_run_end(fl, i, b);
    }
}

static bool is_crlf(uint32_t c) {
    return c == '\r' || c == '\n';
}

static void split_llama3(const uint32_t *cps, const uint8_t *fl, size_t a, size_t b, uint8_t *cut,
                         size_t max_digits) {
    size_t i = a;
    while (i < b) {
        cut[i] = 1;
        size_t k = contraction(cps, i, b, true);
        if (k) {
            i += k;
            continue;
        }
        uint32_t c = cps[i];
        uint8_t f = fl[i];
        /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        size_t j = i;
        if (!IS_L(f) && !IS_N(f) && !is_crlf(c) && i + 1 < b && IS_L(fl[i + 1])) j = i + 1;
        if (IS_L(fl[j])) {
            while (j < b && IS_L(fl[j]))
                j++;
            i = j;
            continue;
        }
        /* \p{N}{1,max} */
        if (IS_N(f)) {
            j = i;
            while (j < b && j - i < max_digits && IS_N(fl[j]))
                j++;
            i = j;
            continue;
        }
        /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
        j = i + (c == ' ' ? 1 : 0);
        if (j < b && !(fl[j] & (CP_UFLAG_SPACE | CP_UCAT_L | CP_UCAT_N))) {
            while (j < b && !(fl[j] & (CP_UFLAG_SPACE | CP_UCAT_L | CP_UCAT_N)))
                j++;
            while (j < b && is_crlf(cps[j]))
                j++;
            i = j;
            continue;
        }
        /* \s*[\r\n]+ : up to and including the run's last newline */
        size_t e = i, last_nl = SIZE_MAX;
        while (e < b && IS_WS(fl[e])) {
            if (is_crlf(cps[e])) last_nl = e;
            e++;
        }
        if (last_nl != SIZE_MAX) {
            i = last_nl + 1;
            continue;
        }
        i = ws_run_end(fl, i, b);
    }
}

/* ---- encoding ---------------------------------------------------------------- */

typedef struct sym {
    int32_t prev, next;
    uint32_t start, len; /* bytes of the word */
    int32_t id;          /* token of this text, -1 when none */
} sym;

typedef struct bigram {
    double key; /* lower merges first: rank, or -score */
    uint32_t left, right, len;
    int32_t result;
} bigram;

typedef struct work {
    sym *syms;
    size_t syms_cap;
    bigram *heap;
    size_t heap_n, heap_cap;
    uint32_t *cps;
    size_t cps_cap;
    uint8_t *fl;
    size_t fl_cap;
    uint8_t *cut;
    size_t cut_cap;
    size_t *offs;
    size_t offs_cap;
    char *buf;
    size_t buf_cap;
} work;

static void work_free(work *w) {
    free(w->syms);
    free(w->heap);
    free(w->cps);
    free(w->fl);
    free(w->cut);
    free(w->offs);
    free(w->buf);
}

static bool bigram_before(const bigram *x, const bigram *y) {
    return x->key < y->key || (x->key == y->key && x->left < y->left);
}

static cp_status heap_push(work *w, bigram g) {
    CP_CHECK(grow((void **)&w->heap, &w->heap_cap, w->heap_n + 1, sizeof(bigram)));
    size_t i = w->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bigram_before(&g, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = g;
    return CP_OK;
}

static bigram heap_pop(work *w) {
    bigram top = w->heap[0];
    bigram last = w->heap[--w->heap_n];
    size_t i = 0, n = w->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && bigram_before(&w->heap[c + 1], &w->heap[c])) c++;
        if (!bigram_before(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

static cp_status try_pair(const struct cp_tokenizer *t, work *w, const char *word, int32_t l,
                          int32_t r) {
    if (l < 0 || r < 0) return CP_OK;
    const sym *L = &w->syms[l], *R = &w->syms[r];
    bigram g = {0, (uint32_t)l, (uint32_t)r, L->len + R->len, -1};
    if (t->use_ranks) {
        if (L->id < 0 || R->id < 0) return CP_OK;
        const merge_slot *m = find_merge(t, L->id, R->id);
        if (!m) return CP_OK;
        g.key = m->rank;
        g.result = m->result;
    } else {
        int32_t id = lookup(t, word + L->start, g.len);
        if (id < 0 || !is_mergeable_type(t->types[id])) return CP_OK;
        g.key = -(double)t->scores[id];
        g.result = id;
    }
    return heap_push(w, g);
}

/* Emits the tokens of a symbol no token covers: SentencePiece byte fallback
 * (<0xAB> per byte), else the unknown token. */
static cp_status emit_fallback(const struct cp_tokenizer *t, const char *s, size_t n, ivec *out) {
    bool bytes_ok = true;
    for (size_t i = 0; i < n; i++)
        if (t->byte_tok[(uint8_t)s[i]] < 0 || t->model == MODEL_BPE) bytes_ok = false;
    if (bytes_ok) {
        for (size_t i = 0; i < n; i++)
            CP_CHECK(ivec_push(out, t->byte_tok[(uint8_t)s[i]]));
        return CP_OK;
    }
    if (t->unk >= 0) return ivec_push(out, t->unk);
    return CP_ERROR(CP_ERR_UNSUPPORTED,
                    "text contains \"%.*s\", which no token covers, and the vocabulary has "
                    "neither byte tokens nor an unknown token",
                    (int)n, s);
}

/* BPE over one word. Byte-level: one initial symbol per byte (ids from the
 * byte map); SentencePiece: one per UTF-8 character. */
static cp_status merge_word(const struct cp_tokenizer *t, work *w, const char *word, size_t n,
                            ivec *out) {
    if (n == 0) return CP_OK;
    if (t->ignore_merges) {
        CP_CHECK(grow((void **)&w->buf, &w->buf_cap, 2 * n, 1));
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            uint8_t b = (uint8_t)word[i];
            memcpy(w->buf + m, t->byte_map[b], t->byte_map_len[b]);
            m += t->byte_map_len[b];
        }
        int32_t id = lookup(t, w->buf, m);
        if (id >= 0) return ivec_push(out, id);
    }
    CP_CHECK(grow((void **)&w->syms, &w->syms_cap, n, sizeof(sym)));
    size_t ns = 0;
    for (size_t i = 0; i < n;) {
        size_t k = t->model == MODEL_BPE ? 1 : cp_utf8_len((uint8_t)word[i]);
        if (k > n - i) k = n - i;
        sym *s = &w->syms[ns];
        s->prev = (int32_t)ns - 1;
        s->next = i + k < n ? (int32_t)ns + 1 : -1;
        s->start = (uint32_t)i;
        s->len = (uint32_t)k;
        s->id = t->model == MODEL_BPE ? t->byte_tok[(uint8_t)word[i]] : lookup(t, word + i, k);
        if (s->id >= 0 && t->model == MODEL_SPM && !is_mergeable_type(t->types[s->id])) s->id = -1;
        ns++;
        i += k;
    }
    w->heap_n = 0;
    for (size_t i = 1; i < ns; i++)
        CP_CHECK(try_pair(t, w, word, (int32_t)i - 1, (int32_t)i));
    while (w->heap_n) {
        bigram g = heap_pop(w);
        sym *L = &w->syms[g.left], *R = &w->syms[g.right];
        /* Stale when either side has changed since the pair was queued;
         * symbols keep their start, so adjacency plus the total length
         * proves that the text is unchanged. */
        if (L->len == 0 || R->len == 0 || L->next != (int32_t)g.right || L->len + R->len != g.len)
            continue;
        L->len += R->len;
        L->id = g.result;
        R->len = 0;
        L->next = R->next;
        if (R->next >= 0) w->syms[R->next].prev = (int32_t)g.left;
        CP_CHECK(try_pair(t, w, word, L->prev, (int32_t)g.left));
        CP_CHECK(try_pair(t, w, word, (int32_t)g.left, L->next));
    }
    for (int32_t i = 0; i >= 0; i = w->syms[i].next) {
        const sym *s = &w->syms[i];
        if (s->id >= 0)
            CP_CHECK(ivec_push(out, s->id));
        else
            CP_CHECK(emit_fallback(t, word + s->start, s->len, out));
    }
    return CP_OK;
}

static cp_status encode_bpe_fragment(const struct cp_tokenizer *t, work *w, const char *s, size_t n,
                                     ivec *out) {
    CP_CHECK(grow((void **)&w->cps, &w->cps_cap, n, sizeof(uint32_t)));
    CP_CHECK(grow((void **)&w->fl, &w->fl_cap, n, 1));
    CP_CHECK(grow((void **)&w->cut, &w->cut_cap, n + 1, 1));
    CP_CHECK(grow((void **)&w->offs, &w->offs_cap, n + 1, sizeof(size_t)));
    size_t nc = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c;
        size_t k = cp_utf8_decode((const uint8_t *)s + i, n - i, &c);
        CP_ASSERT(k > 0); /* validated by the caller */
        w->cps[nc] = c;
        w->fl[nc] = cp_unicode_flags(c);
        w->offs[nc] = i;
        nc++;
        i += k;
    }
    w->offs[nc] = n;
    memset(w->cut, 0, nc + 1);
    w->cut[0] = w->cut[nc] = 1;
    for (int si = 0; si < MAX_STAGES && t->pre->stages[si] != ST_END; si++) {
        stage stg = t->pre->stages[si];
        size_t a = 0;
        while (a < nc) {
            size_t b = a + 1;
            while (!w->cut[b])
                b++;
            switch (stg) {
            case ST_DIGIT1: split_class_runs(w->fl, a, b, w->cut, CP_UCAT_N, true); break;
            case ST_NRUN: split_class_runs(w->fl, a, b, w->cut, CP_UCAT_N, false); break;
            case ST_DIGIT3: split_digit3(w->cps, a, b, w->cut); break;
            case ST_PUNCT_RUN: split_punct_runs(w->cps, w->fl, a, b, w->cut); break;
            case ST_GPT2: split_gpt2(w->cps, w->fl, a, b, w->cut); break;
            case ST_LLAMA3: split_llama3(w->cps, w->fl, a, b, w->cut, 3); break;
            case ST_QWEN2: split_llama3(w->cps, w->fl, a, b, w->cut, 1); break;
            case ST_END: break;
            }
            a = b;
        }
    }
    size_t a = 0;
    while (a < nc) {
        size_t b = a + 1;
        while (!w->cut[b])
            b++;
        CP_CHECK(merge_word(t, w, s + w->offs[a], w->offs[b] - w->offs[a], out));
        a = b;
    }
    return CP_OK;
}

static cp_status encode_spm_fragment(const struct cp_tokenizer *t, work *w, const char *s, size_t n,
                                     bool prefix, ivec *out) {
    CP_CHECK(grow((void **)&w->buf, &w->buf_cap, 3 * n + 3, 1));
    char *e = w->buf;
    size_t m = 0;
    if (prefix) {
        memcpy(e, "\xe2\x96\x81", 3);
        m = 3;
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ') {
            memcpy(e + m, "\xe2\x96\x81", 3);
            m += 3;
        } else {
            e[m++] = s[i];
        }
    }
    /* merge_word may reuse w->buf only for ignore_merges, which SentencePiece
     * never sets, so the escaped text stays valid. */
    return merge_word(t, w, e, m, out);
}

typedef struct frag {
    size_t off, len;
    int32_t tok; /* >= 0: a special token; -1: raw text */
} frag;

/* Splits the text at special-token occurrences: each candidate, longest
 * first, is cut out of every raw fragment that remains (llama.cpp's order). */
/* Whether [off, off + n) overlaps one of lit[n_lit] (ascending, disjoint). */
static bool overlaps(const cp_text_span *lit, size_t n_lit, size_t off, size_t n) {
    size_t lo = 0, hi = n_lit;
    while (lo < hi) { /* first span that ends after off */
        size_t mid = lo + (hi - lo) / 2;
        if (lit[mid].off + lit[mid].len <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n_lit && lit[lo].off < off + n && lit[lo].len > 0;
}

/* Cuts text into fragments: special-token matches and the plain text
 * between them. Control tokens match only with parse_special, and never
 * where they overlap lit[n_lit]; user-defined tokens always match. */
static cp_status partition(const struct cp_tokenizer *t, const char *text, size_t len,
                           bool parse_special, const cp_text_span *lit, size_t n_lit,
                           frag **out, size_t *n_out) {
    frag *cur = NULL, *nxt = NULL;
    size_t ncur = 0, cap_cur = 0, cap_nxt = 0;
    cp_status st = CP_OK;
    CP_CHECK_GOTO(grow((void **)&cur, &cap_cur, 1, sizeof(frag)), st, fail);
    cur[0] = (frag){0, len, -1};
    ncur = len ? 1 : 0;
    for (size_t si = 0; si < t->n_special && ncur; si++) {
        int32_t id = t->special[si];
        uint8_t ty = t->types[id];
        if (!parse_special && ty != CP_TOKEN_USER_DEFINED) continue;
        size_t sl;
        const char *sp = tok_text(t, id, &sl);
        size_t nn = 0;
        for (size_t fi = 0; fi < ncur; fi++) {
            frag f = cur[fi];
            if (f.tok >= 0 || f.len < sl) {
                CP_CHECK_GOTO(grow((void **)&nxt, &cap_nxt, nn + 1, sizeof(frag)), st, fail);
                nxt[nn++] = f;
                continue;
            }
            size_t pos = f.off, end = f.off + f.len;
            while (pos < end) {
                const char *hit = NULL;
                const char *p = text + pos;
                size_t rem = end - pos;
                while (rem >= sl) {
                    const char *q = memchr(p, sp[0], rem - sl + 1);
                    if (!q) break;
                    if (memcmp(q, sp, sl) == 0 &&
                        (ty == CP_TOKEN_USER_DEFINED ||
                         !overlaps(lit, n_lit, (size_t)(q - text), sl))) {
                        hit = q;
                        break;
                    }
                    rem -= (size_t)(q + 1 - p);
                    p = q + 1;
                }
                CP_CHECK_GOTO(grow((void **)&nxt, &cap_nxt, nn + 2, sizeof(frag)), st, fail);
                if (!hit) {
                    nxt[nn++] = (frag){pos, end - pos, -1};
                    break;
                }
                size_t h = (size_t)(hit - text);
                if (h > pos) nxt[nn++] = (frag){pos, h - pos, -1};
                nxt[nn++] = (frag){h, sl, id};
                pos = h + sl;
            }
        }
        frag *tmp = cur;
        cur = nxt;
        nxt = tmp;
        size_t tc = cap_cur;
        cap_cur = cap_nxt;
        cap_nxt = tc;
        ncur = nn;
    }
    free(nxt);
    *out = cur;
    *n_out = ncur;
    return CP_OK;
fail:
    free(cur);
    free(nxt);
    return st;
}

static cp_status encode(cp_tokenizer_t t, const char *text, size_t len, bool add_special,
                        bool parse_special, const cp_text_span *lit, size_t n_lit, int32_t **ids,
                        size_t *n_ids) {
    if (!t || !ids || !n_ids || (!text && len))
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_encode: NULL tokenizer, text or output");
    *ids = NULL;
    *n_ids = 0;
    if (len > (size_t)INT32_MAX) /* symbol offsets are 32-bit */
        return CP_ERROR(CP_ERR_INVALID_ARG,
                        "text of %zu bytes is too long to tokenize (limit 2 GiB)", len);
    size_t bad;
    if (len && !cp_utf8_valid(text, len, &bad))
        return CP_ERROR(CP_ERR_INVALID_ARG, "text is not valid UTF-8 at byte %zu (0x%02X)", bad,
                        (unsigned)(uint8_t)text[bad]);
    ivec out = {0};
    work w = {0};
    frag *frags = NULL;
    size_t nf = 0;
    cp_status st = CP_OK;
    if (add_special && t->add_bos) CP_CHECK_GOTO(ivec_push(&out, t->bos), st, fail);
    if (len) CP_CHECK_GOTO(partition(t, text, len, parse_special, lit, n_lit, &frags, &nf), st, fail);
    bool prev_special = true; /* SentencePiece: a space prefix at the start and after specials */
    for (size_t i = 0; i < nf; i++) {
        const frag *f = &frags[i];
        if (f->tok >= 0) {
            CP_CHECK_GOTO(ivec_push(&out, f->tok), st, fail);
            prev_special = true;
        } else if (t->model == MODEL_BPE) {
            CP_CHECK_GOTO(encode_bpe_fragment(t, &w, text + f->off, f->len, &out), st, fail);
        } else {
            CP_CHECK_GOTO(encode_spm_fragment(t, &w, text + f->off, f->len,
                                              t->add_space_prefix && prev_special, &out),
                          st, fail);
            prev_special = false;
        }
    }
    if (add_special && t->add_eos) CP_CHECK_GOTO(ivec_push(&out, t->eos), st, fail);
    free(frags);
    work_free(&w);
    *ids = out.v;
    *n_ids = out.n;
    if (out.n == 0) {
        free(out.v);
        *ids = NULL;
    }
    return CP_OK;
fail:
    free(frags);
    work_free(&w);
    free(out.v);
    return st;
}

cp_status cp_tokenizer_encode(cp_tokenizer_t t, const char *text, size_t len, bool add_special,
                              bool parse_special, int32_t **ids, size_t *n_ids) {
    return encode(t, text, len, add_special, parse_special, NULL, 0, ids, n_ids);
}

cp_status cp_tokenizer_encode_literal(cp_tokenizer_t t, const char *text, size_t len,
                                      bool add_special, const cp_text_span *literal,
                                      size_t n_literal, int32_t **ids, size_t *n_ids) {
    if (n_literal && !literal)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_encode_literal: NULL spans");
    for (size_t i = 0; i < n_literal; i++)
        if (literal[i].off > len || literal[i].len > len - literal[i].off ||
            (i && literal[i].off < literal[i - 1].off + literal[i - 1].len))
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "literal span %zu [%zu, +%zu) is outside the text of %zu bytes or "
                            "not after the previous one",
                            i, literal[i].off, literal[i].len, len);
    return encode(t, text, len, add_special, true, literal, n_literal, ids, n_ids);
}

/* ---- decoding and queries ------------------------------------------------ */

cp_status cp_tokenizer_piece(cp_tokenizer_t t, int32_t id, bool special, const char **bytes,
                             size_t *len) {
    if (!t || !bytes || !len)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_piece: NULL argument");
    if (id < 0 || id >= t->n_vocab)
        return CP_ERROR(CP_ERR_INVALID_ARG, "token id %d is outside the vocabulary (0..%d)",
                        (int)id, (int)t->n_vocab - 1);
    uint8_t ty = t->types[id];
    *bytes = t->piece + t->piece_off[id];
    *len = (size_t)(t->piece_off[id + 1] - t->piece_off[id]);
    if (!special && (ty == CP_TOKEN_CONTROL || ty == CP_TOKEN_UNKNOWN || ty == CP_TOKEN_UNUSED))
        *len = 0;
    return CP_OK;
}

cp_status cp_tokenizer_decode(cp_tokenizer_t t, const int32_t *ids, size_t n, bool special,
                              char **text, size_t *len) {
    if (!t || !text || (!ids && n))
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_decode: NULL argument");
    *text = NULL;
    if (len) *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return CP_ERROR(CP_ERR_INVALID_ARG,
                            "token id %d at position %zu is outside the vocabulary (0..%d)",
                            (int)ids[i], i, (int)t->n_vocab - 1);
        total += (size_t)(t->piece_off[ids[i] + 1] - t->piece_off[ids[i]]);
    }
    char *buf = malloc(total + 1);
    if (!buf) return CP_ERROR(CP_ERR_OOM, "out of memory decoding %zu tokens", n);
    size_t o = 0;
    bool strip = t->add_space_prefix; /* undo the space prefix encode added */
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t l;
        cp_tokenizer_piece(t, ids[i], special, &p, &l);
        if (l == 0) continue;
        if (strip && p[0] == ' ' && t->types[ids[i]] != CP_TOKEN_CONTROL) {
            p++;
            l--;
        }
        strip = false;
        memcpy(buf + o, p, l);
        o += l;
    }
    buf[o] = '\0';
    *text = buf;
    if (len) *len = o;
    return CP_OK;
}

int32_t cp_tokenizer_n_vocab(cp_tokenizer_t t) {
    return t ? t->n_vocab : 0;
}
int32_t cp_tokenizer_bos(cp_tokenizer_t t) {
    return t ? t->bos : -1;
}
int32_t cp_tokenizer_eos(cp_tokenizer_t t) {
    return t ? t->eos : -1;
}
bool cp_tokenizer_add_bos(cp_tokenizer_t t) {
    return t && t->add_bos;
}

int32_t cp_tokenizer_find(cp_tokenizer_t t, const char *text, size_t len) {
    if (!t || !text) return -1;
    return lookup(t, text, len);
}

cp_token_type cp_tokenizer_token_type(cp_tokenizer_t t, int32_t id) {
    if (!t || id < 0 || id >= t->n_vocab) return CP_TOKEN_UNDEFINED;
    return (cp_token_type)t->types[id];
}

bool cp_tokenizer_is_eog(cp_tokenizer_t t, int32_t id) {
    if (!t || id < 0 || id >= t->n_vocab) return false;
    return (t->tflags[id] & TF_EOG) != 0;
}

const char *cp_tokenizer_chat_template(cp_tokenizer_t t) {
    return t ? t->chat_template : NULL;
}

/* The EOS token's text for chat formats that write it ("</s>" without one). */
static void eos_text(const struct cp_tokenizer *t, char *buf, size_t cap) {
    snprintf(buf, cap, "</s>");
    if (t->eos < 0) return;
    size_t l;
    const char *s = tok_text(t, t->eos, &l);
    if (l > 0 && l < cap) {
        memcpy(buf, s, l);
        buf[l] = '\0';
    }
}

cp_status cp_tokenizer_apply_chat(cp_tokenizer_t t, const cp_chat_msg *msgs, size_t n,
                                  unsigned flags, char **out) {
    if (!t || !out)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_apply_chat: NULL tokenizer or output");
    char eos_buf[64];
    eos_text(t, eos_buf, sizeof(eos_buf));
    return cp_chat_format(t->chat_template, eos_buf, msgs, n, flags, out);
}

cp_status cp_tokenizer_encode_chat(cp_tokenizer_t t, const cp_chat_msg *msgs, size_t n,
                                   unsigned flags, int32_t **ids, size_t *n_ids, char **text) {
    if (!t || !ids || !n_ids)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_encode_chat: NULL argument");
    *ids = NULL;
    *n_ids = 0;
    if (text) *text = NULL;
    char eos_buf[64];
    eos_text(t, eos_buf, sizeof(eos_buf));
    char *out = NULL;
    cp_text_span *spans = NULL;
    size_t n_spans = 0;
    CP_CHECK(cp_chat_format_spans(t->chat_template, eos_buf, msgs, n, flags, &out, &spans,
                                  &n_spans));
    cp_status st = cp_tokenizer_encode_literal(t, out, strlen(out), true, spans, n_spans, ids,
                                               n_ids);
    free(spans);
    if (st == CP_OK && text)
        *text = out;
    else
        free(out);
    return st;
}

/* ---- GGUF glue -------------------------------------------------------------- */

static cp_status gguf_array(cp_gguf_t g, const char *key, cp_gguf_type want, bool required,
                            int64_t *idx, uint64_t *n) {
    *idx = cp_gguf_find_key(g, key);
    *n = 0;
    if (*idx < 0) {
        if (required)
            return CP_ERROR(CP_ERR_FORMAT, "GGUF file has no \"%s\" key: it carries no tokenizer",
                            key);
        return CP_OK;
    }
    if (cp_gguf_kv_type(g, *idx) != CP_GGUF_ARRAY || cp_gguf_arr_type(g, *idx) != want)
        return CP_ERROR(CP_ERR_FORMAT,
                        "GGUF key \"%s\" has the wrong type (expected an array of type %d)", key,
                        (int)want);
    *n = cp_gguf_arr_n(g, *idx);
    return CP_OK;
}

static cp_status gguf_id(cp_gguf_t g, const char *key, int32_t dflt, int64_t n_vocab,
                         int32_t *out) {
    int64_t v = cp_gguf_get_i64_or(g, key, dflt);
    if (cp_gguf_find_key(g, key) >= 0 && (v < 0 || v >= n_vocab))
        return CP_ERROR(CP_ERR_FORMAT, "GGUF key \"%s\" = %lld is outside the vocabulary (0..%lld)",
                        key, (long long)v, (long long)n_vocab - 1);
    *out = (v >= 0 && v < n_vocab) ? (int32_t)v : -1;
    return CP_OK;
}

cp_status cp_tokenizer_init_gguf(cp_gguf_t g, cp_tokenizer_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_init_gguf: out is NULL");
    *out = NULL;
    if (!g) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_init_gguf: NULL GGUF handle");
    char model[32], pre[64];
    cp_str *toks = NULL, *merges = NULL;
    float *scores = NULL;
    int32_t *types = NULL;
    char *tmpl = NULL;
    cp_status st = CP_OK;
    if (!cp_gguf_get_str_buf(g, "tokenizer.ggml.model", model, sizeof(model)))
        return CP_ERROR(
            CP_ERR_FORMAT,
            "GGUF file has no string key \"tokenizer.ggml.model\": it carries no tokenizer");
    bool has_pre = cp_gguf_get_str_buf(g, "tokenizer.ggml.pre", pre, sizeof(pre));

    int64_t ki;
    uint64_t n, nm = 0, nx;
    CP_CHECK_GOTO(gguf_array(g, "tokenizer.ggml.tokens", CP_GGUF_STRING, true, &ki, &n), st, fail);
    if (n == 0 || n >= INT32_MAX) {
        st = CP_ERROR(CP_ERR_FORMAT, "GGUF \"tokenizer.ggml.tokens\" has %llu entries",
                      (unsigned long long)n);
        goto fail;
    }
    toks = malloc(n * sizeof(cp_str));
    if (!toks) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for %llu tokens", (unsigned long long)n);
        goto fail;
    }
    for (uint64_t i = 0; i < n; i++)
        toks[i] = cp_gguf_arr_str(g, ki, i);

    CP_CHECK_GOTO(gguf_array(g, "tokenizer.ggml.scores", CP_GGUF_FLOAT32, false, &ki, &nx), st,
                  fail);
    if (ki >= 0) {
        if (nx != n) {
            st = CP_ERROR(CP_ERR_FORMAT,
                          "GGUF \"tokenizer.ggml.scores\" has %llu entries for %llu tokens",
                          (unsigned long long)nx, (unsigned long long)n);
            goto fail;
        }
        scores = malloc(n * sizeof(float));
        if (!scores) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory for token scores");
            goto fail;
        }
        memcpy(scores, cp_gguf_arr_data(g, ki), n * sizeof(float));
    }
    CP_CHECK_GOTO(gguf_array(g, "tokenizer.ggml.token_type", CP_GGUF_INT32, false, &ki, &nx), st,
                  fail);
    if (ki >= 0) {
        if (nx != n) {
            st = CP_ERROR(CP_ERR_FORMAT,
                          "GGUF \"tokenizer.ggml.token_type\" has %llu entries for %llu tokens",
                          (unsigned long long)nx, (unsigned long long)n);
            goto fail;
        }
        types = malloc(n * sizeof(int32_t));
        if (!types) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory for token types");
            goto fail;
        }
        memcpy(types, cp_gguf_arr_data(g, ki), n * sizeof(int32_t));
    }
    CP_CHECK_GOTO(gguf_array(g, "tokenizer.ggml.merges", CP_GGUF_STRING, strcmp(model, "gpt2") == 0,
                             &ki, &nm),
                  st, fail);
    if (nm) {
        merges = malloc(nm * sizeof(cp_str));
        if (!merges) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory for %llu merges", (unsigned long long)nm);
            goto fail;
        }
        for (uint64_t i = 0; i < nm; i++)
            merges[i] = cp_gguf_arr_str(g, ki, i);
    }

    bool spm = strcmp(model, "llama") == 0;
    cp_tokenizer_spec spec = {0};
    spec.model = model;
    spec.pre = has_pre ? pre : NULL;
    spec.n_vocab = (int64_t)n;
    spec.tokens = toks;
    spec.scores = scores;
    spec.token_types = types;
    spec.n_merges = (int64_t)nm;
    spec.merges = merges;
    /* SentencePiece files that omit the ids use <unk>=0 <s>=1 </s>=2. */
    CP_CHECK_GOTO(
        gguf_id(g, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, spec.n_vocab, &spec.bos_id), st,
        fail);
    CP_CHECK_GOTO(
        gguf_id(g, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, spec.n_vocab, &spec.eos_id), st,
        fail);
    CP_CHECK_GOTO(
        gguf_id(g, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, spec.n_vocab, &spec.unk_id), st,
        fail);
    CP_CHECK_GOTO(gguf_id(g, "tokenizer.ggml.padding_token_id", -1, spec.n_vocab, &spec.pad_id), st,
                  fail);
    CP_CHECK_GOTO(gguf_id(g, "tokenizer.ggml.eot_token_id", -1, spec.n_vocab, &spec.eot_id), st,
                  fail);
    spec.add_bos = cp_gguf_get_bool_or(g, "tokenizer.ggml.add_bos_token", spm) && spec.bos_id >= 0;
    spec.add_eos =
        cp_gguf_get_bool_or(g, "tokenizer.ggml.add_eos_token", false) && spec.eos_id >= 0;
    spec.add_space_prefix = cp_gguf_get_bool_or(g, "tokenizer.ggml.add_space_prefix", spm);
    cp_str ts;
    if (cp_gguf_find_key(g, "tokenizer.chat_template") >= 0 &&
        cp_gguf_get_str(g, "tokenizer.chat_template", &ts) == CP_OK) {
        tmpl = malloc(ts.len + 1);
        if (!tmpl) {
            st = CP_ERROR(CP_ERR_OOM, "out of memory copying the chat template");
            goto fail;
        }
        memcpy(tmpl, ts.ptr, ts.len);
        tmpl[ts.len] = '\0';
        spec.chat_template = tmpl;
    }
    st = cp_tokenizer_init(&spec, out);
    if (st == CP_ERR_INVALID_ARG) { /* bad contents of the file, not a bad call */
        char msg[768];
        snprintf(msg, sizeof(msg), "%s", cp_last_error_detail());
        st = CP_ERROR(CP_ERR_FORMAT, "GGUF tokenizer: %s", msg);
    }
fail:
    free(toks);
    free(merges);
    free(scores);
    free(types);
    free(tmpl);
    return st;
}
