/* tokenizer_json.c - builds a tokenizer from a Hugging Face tokenizer.json
 * (BPE model: byte-level, or SentencePiece-style with byte fallback) and an
 * optional tokenizer_config.json (special tokens, add_bos/add_eos, chat
 * template). The pre-tokenizer type is recognised from the JSON structure. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cp_tokenizer.h"

/* The split patterns of known pre-tokenizers, as they appear (decoded) in
 * tokenizer.json "Split" pre-tokenizers. */
static const char RE_LLAMA3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char RE_QWEN2[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char RE_GPT2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char RE_GPT2_SHORT[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";

static const char SPM_SPACE[] = "\xe2\x96\x81"; /* U+2581 */

static const char *jstr(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static bool jtype_is(const json_t *o, const char *type) {
    const char *t = jstr(o, "type");
    return t && strcmp(t, type) == 0;
}

/* Items of a component that may be a "Sequence": its list, or itself. */
static size_t seq_items(const json_t *c, const char *list_key, const json_t **items, size_t cap) {
    if (!json_is_object(c)) return 0;
    if (jtype_is(c, "Sequence")) {
        const json_t *arr = json_object_get(c, list_key);
        size_t n = 0;
        for (size_t i = 0; i < json_array_size(arr) && n < cap; i++)
            items[n++] = json_array_get(arr, i);
        return n;
    }
    items[0] = c;
    return 1;
}

static cp_status load_json(const char *path, json_t **out) {
    json_error_t err;
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return CP_ERROR(CP_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    json_t *j = json_loadf(f, JSON_ALLOW_NUL, &err);
    fclose(f);
    if (!j)
        return CP_ERROR(CP_ERR_FORMAT, "%s is not valid JSON (line %d: %s)", path, err.line,
                        err.text);
    if (!json_is_object(j)) {
        json_decref(j);
        return CP_ERROR(CP_ERR_FORMAT, "%s does not hold a JSON object", path);
    }
    *out = j;
    return CP_OK;
}

/* A special-token entry of tokenizer_config.json: "text" or {"content": "text"}. */
static const char *config_token(const json_t *cfg, const char *key) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_string(v)) return json_string_value(v);
    if (json_is_object(v)) return jstr(v, "content");
    return NULL;
}

typedef struct vocab_ctx {
    const json_t *vocab, *added;
} vocab_ctx;

static int32_t find_id(const vocab_ctx *v, const char *text) {
    if (!text) return -1;
    for (size_t i = 0; i < json_array_size(v->added); i++) {
        const json_t *a = json_array_get(v->added, i);
        const char *c = jstr(a, "content");
        if (c && strcmp(c, text) == 0 && json_is_integer(json_object_get(a, "id")))
            return (int32_t)json_integer_value(json_object_get(a, "id"));
    }
    const json_t *id = json_object_get(v->vocab, text);
    return json_is_integer(id) ? (int32_t)json_integer_value(id) : -1;
}

/* Recognises the byte-level pre-tokenizer: Digits(individual) + ByteLevel is
 * "smollm", ByteLevel alone "gpt2", Split(known regex) + ByteLevel(no regex)
 * "llama3"/"qwen2"/"gpt2". */
static cp_status byte_level_pre(const json_t *pre, const char **name) {
    const json_t *items[16];
    size_t n = seq_items(pre, "pretokenizers", items, 16);
    bool digits = false, bl_regex = false;
    const char *split = NULL;
    for (size_t i = 0; i < n; i++) {
        const json_t *it = items[i];
        if (jtype_is(it, "ByteLevel")) {
            if (json_is_true(json_object_get(it, "add_prefix_space")))
                return CP_ERROR(
                    CP_ERR_UNSUPPORTED,
                    "ByteLevel pre-tokenizer with add_prefix_space=true is not supported");
            const json_t *ur = json_object_get(it, "use_regex");
            bl_regex = !json_is_false(ur); /* absent means true */
        } else if (jtype_is(it, "Digits")) {
            if (!json_is_true(json_object_get(it, "individual_digits")))
                return CP_ERROR(CP_ERR_UNSUPPORTED,
                                "Digits pre-tokenizer without individual_digits is not supported");
            if (bl_regex || split)
                return CP_ERROR(CP_ERR_UNSUPPORTED,
                                "a Digits pre-tokenizer after ByteLevel/Split is not supported");
            digits = true;
        } else if (jtype_is(it, "Split")) {
            const json_t *pat = json_object_get(it, "pattern");
            split = jstr(pat, "Regex");
            if (!split) split = jstr(pat, "String");
            if (!split) return CP_ERROR(CP_ERR_FORMAT, "Split pre-tokenizer without a pattern");
        } else {
            const char *t = jstr(it, "type");
            return CP_ERROR(CP_ERR_UNSUPPORTED,
                            "pre-tokenizer \"%s\" is not supported with a byte-level BPE",
                            t ? t : "?");
        }
    }
    if (split) {
        if (bl_regex)
            return CP_ERROR(CP_ERR_UNSUPPORTED,
                            "a Split pre-tokenizer followed by a regex ByteLevel is not supported");
        if (strcmp(split, RE_LLAMA3) == 0 && !digits)
            *name = "llama3";
        else if (strcmp(split, RE_QWEN2) == 0 && !digits)
            *name = "qwen2";
        else if (strcmp(split, RE_GPT2) == 0 || strcmp(split, RE_GPT2_SHORT) == 0)
            *name = digits ? "smollm" : "gpt2";
        else
            return CP_ERROR(CP_ERR_UNSUPPORTED,
                            "pre-tokenizer split pattern \"%.300s\" is not supported", split);
        return CP_OK;
    }
    if (!bl_regex)
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "ByteLevel pre-tokenizer without a splitting regex is not supported");
    *name = digits ? "smollm" : "gpt2";
    return CP_OK;
}

/* SentencePiece style: the space prefix comes from a Prepend("▁") normalizer
 * or a Metaspace pre-tokenizer with a prepend scheme. */
static bool spm_space_prefix(const json_t *root) {
    const json_t *items[16];
    size_t n = seq_items(json_object_get(root, "normalizer"), "normalizers", items, 16);
    for (size_t i = 0; i < n; i++) {
        const char *p = jstr(items[i], "prepend");
        if (jtype_is(items[i], "Prepend") && p && strcmp(p, SPM_SPACE) == 0) return true;
    }
    n = seq_items(json_object_get(root, "pre_tokenizer"), "pretokenizers", items, 16);
    for (size_t i = 0; i < n; i++) {
        if (!jtype_is(items[i], "Metaspace")) continue;
        const char *scheme = jstr(items[i], "prepend_scheme");
        if (scheme) return strcmp(scheme, "never") != 0;
        return !json_is_false(json_object_get(items[i], "add_prefix_space"));
    }
    return false;
}

static bool mentions_type(const json_t *c, const char *list_key, const char *type) {
    const json_t *items[16];
    size_t n = seq_items(c, list_key, items, 16);
    for (size_t i = 0; i < n; i++)
        if (jtype_is(items[i], type)) return true;
    return false;
}

/* BOS/EOS the post-processor adds around a single sequence. */
static void post_processor_specials(const json_t *root, const vocab_ctx *v, int32_t *bos,
                                    int32_t *eos) {
    const json_t *items[16];
    size_t n = seq_items(json_object_get(root, "post_processor"), "processors", items, 16);
    for (size_t i = 0; i < n; i++) {
        if (!jtype_is(items[i], "TemplateProcessing")) continue;
        const json_t *single = json_object_get(items[i], "single");
        size_t m = json_array_size(single);
        if (m == 0) continue;
        const json_t *first = json_object_get(json_array_get(single, 0), "SpecialToken");
        const json_t *last = json_object_get(json_array_get(single, m - 1), "SpecialToken");
        if (first) *bos = find_id(v, jstr(first, "id"));
        if (last && m > 1) *eos = find_id(v, jstr(last, "id"));
    }
}

cp_status cp_tokenizer_init_json(const char *tokenizer_json, const char *tokenizer_config_json,
                                 cp_tokenizer_t *out) {
    if (!out) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_init_json: out is NULL");
    *out = NULL;
    if (!tokenizer_json)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_tokenizer_init_json: no tokenizer.json path");
    json_t *root = NULL, *cfg = NULL;
    cp_str *toks = NULL, *merges = NULL;
    int32_t *types = NULL;
    char *marena = NULL;
    cp_status st = CP_OK;
    CP_CHECK_GOTO(load_json(tokenizer_json, &root), st, fail);
    if (tokenizer_config_json) CP_CHECK_GOTO(load_json(tokenizer_config_json, &cfg), st, fail);

    const json_t *model = json_object_get(root, "model");
    const char *mtype = jstr(model, "type");
    if (!json_is_object(model) || (mtype && strcmp(mtype, "BPE") != 0)) {
        st = CP_ERROR(CP_ERR_UNSUPPORTED, "%s: tokenizer model \"%s\" is not supported (only BPE)",
                      tokenizer_json, mtype ? mtype : "?");
        goto fail;
    }
    vocab_ctx vc = {json_object_get(model, "vocab"), json_object_get(root, "added_tokens")};
    const json_t *jmerges = json_object_get(model, "merges");
    if (!json_is_object(vc.vocab) || !json_is_array(jmerges)) {
        st = CP_ERROR(CP_ERR_FORMAT, "%s: model.vocab (object) or model.merges (array) is missing",
                      tokenizer_json);
        goto fail;
    }

    /* vocabulary: ids must be dense except for holes filled as unused */
    int64_t n = 0;
    const char *key;
    size_t klen;
    json_t *val;
    json_object_keylen_foreach((json_t *)vc.vocab, key, klen, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 ||
            json_integer_value(val) >= INT32_MAX - 1) {
            st = CP_ERROR(CP_ERR_FORMAT, "%s: vocab entry \"%.*s\" has no valid id", tokenizer_json,
                          (int)klen, key);
            goto fail;
        }
        if (json_integer_value(val) + 1 > n) n = json_integer_value(val) + 1;
    }
    for (size_t i = 0; i < json_array_size(vc.added); i++) {
        const json_t *a = json_array_get(vc.added, i);
        const json_t *id = json_object_get(a, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= INT32_MAX - 1 ||
            !json_is_string(json_object_get(a, "content"))) {
            st = CP_ERROR(CP_ERR_FORMAT, "%s: added_tokens[%zu] has no valid id or content",
                          tokenizer_json, i);
            goto fail;
        }
        if (json_integer_value(id) + 1 > n) n = json_integer_value(id) + 1;
    }
    if (n == 0) {
        st = CP_ERROR(CP_ERR_FORMAT, "%s: empty vocabulary", tokenizer_json);
        goto fail;
    }
    toks = calloc((size_t)n, sizeof(cp_str));
    types = malloc((size_t)n * sizeof(int32_t));
    if (!toks || !types) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for %lld tokens", (long long)n);
        goto fail;
    }
    for (int64_t i = 0; i < n; i++)
        types[i] = CP_TOKEN_UNUSED;
    json_object_keylen_foreach((json_t *)vc.vocab, key, klen, val) {
        int64_t id = json_integer_value(val);
        toks[id] = (cp_str){key, klen};
        types[id] = CP_TOKEN_NORMAL;
    }
    for (size_t i = 0; i < json_array_size(vc.added); i++) {
        const json_t *a = json_array_get(vc.added, i);
        int64_t id = json_integer_value(json_object_get(a, "id"));
        const json_t *c = json_object_get(a, "content");
        toks[id] = (cp_str){json_string_value(c), json_string_length(c)};
        types[id] =
            json_is_true(json_object_get(a, "special")) ? CP_TOKEN_CONTROL : CP_TOKEN_USER_DEFINED;
    }

    /* merges: "a b" strings, or [a, b] pairs (joined with a space) */
    size_t nm = json_array_size(jmerges), total = 0;
    for (size_t i = 0; i < nm; i++) {
        const json_t *m = json_array_get(jmerges, i);
        if (json_is_string(m)) continue;
        if (!json_is_array(m) || json_array_size(m) != 2 || !json_is_string(json_array_get(m, 0)) ||
            !json_is_string(json_array_get(m, 1))) {
            st = CP_ERROR(CP_ERR_FORMAT, "%s: merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]",
                          tokenizer_json, i);
            goto fail;
        }
        total +=
            json_string_length(json_array_get(m, 0)) + json_string_length(json_array_get(m, 1)) + 1;
    }
    merges = malloc((nm ? nm : 1) * sizeof(cp_str));
    marena = malloc(total + 1);
    if (!merges || !marena) {
        st = CP_ERROR(CP_ERR_OOM, "out of memory for %zu merges", nm);
        goto fail;
    }
    size_t mo = 0;
    for (size_t i = 0; i < nm; i++) {
        const json_t *m = json_array_get(jmerges, i);
        if (json_is_string(m)) {
            merges[i] = (cp_str){json_string_value(m), json_string_length(m)};
            continue;
        }
        const json_t *a = json_array_get(m, 0), *b = json_array_get(m, 1);
        size_t la = json_string_length(a), lb = json_string_length(b);
        memcpy(marena + mo, json_string_value(a), la);
        marena[mo + la] = ' ';
        memcpy(marena + mo + la + 1, json_string_value(b), lb);
        merges[i] = (cp_str){marena + mo, la + lb + 1};
        mo += la + lb + 1;
    }

    /* byte-level or SentencePiece style */
    const json_t *pre = json_object_get(root, "pre_tokenizer");
    const char *model_name, *pre_name = NULL;
    bool byte_level = mentions_type(pre, "pretokenizers", "ByteLevel");
    bool spm = json_is_true(json_object_get(model, "byte_fallback")) ||
               mentions_type(pre, "pretokenizers", "Metaspace") ||
               mentions_type(json_object_get(root, "decoder"), "decoders", "ByteFallback") ||
               mentions_type(json_object_get(root, "decoder"), "decoders", "Metaspace");
    if (byte_level) {
        model_name = "gpt2";
        CP_CHECK_GOTO(byte_level_pre(pre, &pre_name), st, fail);
    } else if (spm) {
        model_name = "llama";
        for (int64_t i = 0; i < n; i++) {
            const cp_str *s = &toks[i];
            if (types[i] == CP_TOKEN_NORMAL && s->len == 6 && memcmp(s->ptr, "<0x", 3) == 0 &&
                s->ptr[5] == '>')
                types[i] = CP_TOKEN_BYTE;
        }
    } else {
        st = CP_ERROR(CP_ERR_UNSUPPORTED,
                      "%s: neither a ByteLevel nor a SentencePiece-style (Metaspace/byte_fallback) "
                      "BPE tokenizer",
                      tokenizer_json);
        goto fail;
    }

    cp_tokenizer_spec spec = {0};
    spec.model = model_name;
    spec.pre = pre_name;
    spec.n_vocab = n;
    spec.tokens = toks;
    spec.token_types = types;
    spec.n_merges = (int64_t)nm;
    spec.merges = merges;
    spec.bos_id = spec.eos_id = spec.unk_id = spec.pad_id = spec.eot_id = -1;
    spec.unk_id = find_id(&vc, jstr(model, "unk_token"));
    post_processor_specials(root, &vc, &spec.bos_id, &spec.eos_id);
    spec.add_bos = spec.bos_id >= 0;
    spec.add_eos = spec.eos_id >= 0;
    if (cfg) {
        int32_t id;
        if ((id = find_id(&vc, config_token(cfg, "bos_token"))) >= 0) spec.bos_id = id;
        if ((id = find_id(&vc, config_token(cfg, "eos_token"))) >= 0) spec.eos_id = id;
        if ((id = find_id(&vc, config_token(cfg, "unk_token"))) >= 0) spec.unk_id = id;
        if ((id = find_id(&vc, config_token(cfg, "pad_token"))) >= 0) spec.pad_id = id;
        const json_t *ab = json_object_get(cfg, "add_bos_token"),
                     *ae = json_object_get(cfg, "add_eos_token");
        if (json_is_boolean(ab)) spec.add_bos = json_is_true(ab);
        if (json_is_boolean(ae)) spec.add_eos = json_is_true(ae);
        const json_t *ct = json_object_get(cfg, "chat_template");
        if (json_is_string(ct)) {
            spec.chat_template = json_string_value(ct);
        } else if (json_is_array(ct)) { /* [{"name": ..., "template": ...}]: prefer "default" */
            for (size_t i = 0; i < json_array_size(ct); i++) {
                const json_t *e = json_array_get(ct, i);
                const char *nm_ = jstr(e, "name");
                if (!spec.chat_template || (nm_ && strcmp(nm_, "default") == 0))
                    spec.chat_template = jstr(e, "template");
            }
        }
    } else {
        /* No config: the usual end-of-text names stand in for EOS. */
        static const char *const eos_names[] = {"</s>", "<|endoftext|>", "<|end_of_text|>",
                                                "<eos>"};
        for (size_t i = 0; i < 4 && spec.eos_id < 0; i++)
            spec.eos_id = find_id(&vc, eos_names[i]);
    }
    /* an added (control) token that doubles as unk keeps its type */
    if (spec.unk_id >= 0 && spec.unk_id < n && types[spec.unk_id] == CP_TOKEN_NORMAL)
        types[spec.unk_id] = CP_TOKEN_UNKNOWN;
    spec.add_bos = spec.add_bos && spec.bos_id >= 0;
    spec.add_eos = spec.add_eos && spec.eos_id >= 0;
    spec.add_space_prefix = spm && spm_space_prefix(root);
    st = cp_tokenizer_init(&spec, out);
    if (st == CP_ERR_INVALID_ARG) { /* bad contents of the file, not a bad call */
        char msg[768];
        snprintf(msg, sizeof(msg), "%s", cp_last_error_detail());
        st = CP_ERROR(CP_ERR_FORMAT, "%s: %s", tokenizer_json, msg);
    }
fail:
    free(toks);
    free(types);
    free(merges);
    free(marena);
    json_decref(root);
    json_decref(cfg);
    return st;
}
