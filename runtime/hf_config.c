/* hf_config.c - turns the config.json of a Hugging Face Llama, Mistral or
 * Qwen2 checkpoint into a cp_model_config, refusing settings the forward pass
 * would silently get wrong (other activations, rope scalings, biases), and
 * reads the quantization settings of AWQ / GPTQ checkpoints. */
#include "cp_hf.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <jansson.h>

#define HF_MAX_CONFIG (16u << 20) /* config.json files are a few KB */

typedef struct hf_ctx {
    json_t *root;
    const char *src; /* for messages */
} hf_ctx;

/* An integer in [lo, INT_MAX]; dflt when absent or null unless required. */
static cp_status get_int(const hf_ctx *c, const char *key, bool required, int dflt, int lo,
                         int *out) {
    json_t *v = json_object_get(c->root, key);
    if (!v || json_is_null(v)) {
        if (required)
            return CP_ERROR(CP_ERR_FORMAT, "%s: required key \"%s\" is missing", c->src, key);
        *out = dflt;
        return CP_OK;
    }
    if (!json_is_integer(v))
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"%s\" is not an integer", c->src, key);
    json_int_t x = json_integer_value(v);
    if (x < lo || x > INT_MAX)
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"%s\" = %lld is out of range (at least %d)", c->src,
                        key, (long long)x, lo);
    *out = (int)x;
    return CP_OK;
}

/* A number of obj (integer or real) that must be > 0; dflt when absent or null
 * unless required. */
static cp_status get_pos_num(const hf_ctx *c, json_t *obj, const char *key, bool required,
                             double dflt, double *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required)
            return CP_ERROR(CP_ERR_FORMAT, "%s: required key \"%s\" is missing", c->src, key);
        *out = dflt;
        return CP_OK;
    }
    if (!json_is_number(v))
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"%s\" is not a number", c->src, key);
    double x = json_number_value(v);
    if (!(x > 0.0) || x > 3.0e38)
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"%s\" = %g is out of range (must be > 0)", c->src, key,
                        x);
    *out = x;
    return CP_OK;
}

static cp_status get_bool(const hf_ctx *c, const char *key, bool dflt, bool *out) {
    json_t *v = json_object_get(c->root, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return CP_OK;
    }
    if (!json_is_boolean(v))
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"%s\" is not true or false", c->src, key);
    *out = json_is_true(v);
    return CP_OK;
}

/* model_type, or else the first entry of architectures. */
static cp_status get_arch(const hf_ctx *c, char *arch, size_t cap) {
    static const struct {
        const char *type, *cls;
    } known[] = {
        {"llama", "LlamaForCausalLM"},
        {"mistral", "MistralForCausalLM"},
        {"qwen2", "Qwen2ForCausalLM"},
    };
    json_t *mt = json_object_get(c->root, "model_type");
    json_t *archs = json_object_get(c->root, "architectures");
    json_t *a0 = json_is_array(archs) ? json_array_get(archs, 0) : NULL;
    const char *type = json_is_string(mt) ? json_string_value(mt) : NULL;
    const char *cls = json_is_string(a0) ? json_string_value(a0) : NULL;
    if (!type && !cls)
        return CP_ERROR(CP_ERR_FORMAT, "%s: neither \"model_type\" nor \"architectures\" is given",
                        c->src);
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
        if ((type && strcmp(type, known[i].type) == 0) ||
            (!type && strcmp(cls, known[i].cls) == 0)) {
            snprintf(arch, cap, "%s", known[i].type);
            return CP_OK;
        }
    }
    return CP_ERROR(CP_ERR_UNSUPPORTED,
                    "%s: model type '%s' is not supported (llama, mistral and qwen2 are)", c->src,
                    type ? type : cls);
}

static cp_status get_rope_scaling(const hf_ctx *c, cp_model_config *cfg) {
    json_t *rs = json_object_get(c->root, "rope_scaling");
    if (!rs || json_is_null(rs)) return CP_OK;
    if (!json_is_object(rs))
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"rope_scaling\" is not an object or null", c->src);
    /* Newer transformers write rope_type, older ones type. */
    json_t *jt = json_object_get(rs, "rope_type");
    if (!jt) jt = json_object_get(rs, "type");
    if (!json_is_string(jt))
        return CP_ERROR(CP_ERR_FORMAT, "%s: \"rope_scaling\" has no \"rope_type\" string", c->src);
    const char *type = json_string_value(jt);
    double factor;
    if (strcmp(type, "default") == 0) return CP_OK;
    if (strcmp(type, "linear") == 0) {
        CP_CHECK(get_pos_num(c, rs, "factor", true, 1.0, &factor));
        cfg->rope_freq_scale = (float)(1.0 / factor);
        return CP_OK;
    }
    if (strcmp(type, "llama3") == 0) {
        double lo, hi, orig;
        CP_CHECK(get_pos_num(c, rs, "factor", true, 1.0, &factor));
        CP_CHECK(get_pos_num(c, rs, "low_freq_factor", true, 1.0, &lo));
        CP_CHECK(get_pos_num(c, rs, "high_freq_factor", true, 1.0, &hi));
        CP_CHECK(get_pos_num(c, rs, "original_max_position_embeddings", true, 1.0, &orig));
        if (!(hi > lo))
            return CP_ERROR(CP_ERR_FORMAT,
                            "%s: rope_scaling high_freq_factor (%g) must exceed low_freq_factor "
                            "(%g)",
                            c->src, hi, lo);
        if (orig > INT_MAX || orig != (double)(int)orig)
            return CP_ERROR(CP_ERR_FORMAT,
                            "%s: rope_scaling original_max_position_embeddings is not a valid "
                            "length",
                            c->src);
        cfg->rope_llama3_factor = (float)factor;
        cfg->rope_llama3_low_freq_factor = (float)lo;
        cfg->rope_llama3_high_freq_factor = (float)hi;
        cfg->rope_llama3_orig_ctx = (int)orig;
        return CP_OK;
    }
    return CP_ERROR(CP_ERR_UNSUPPORTED,
                    "%s: rope_scaling type '%s' is not supported (linear and llama3 are)", c->src,
                    type);
}

static cp_status parse_root(const hf_ctx *c, cp_model_config *cfg) {
    memset(cfg, 0, sizeof(*cfg));
    CP_CHECK(get_arch(c, cfg->arch, sizeof(cfg->arch)));
    bool is_qwen2 = strcmp(cfg->arch, "qwen2") == 0;
    bool is_mistral = strcmp(cfg->arch, "mistral") == 0;

    json_t *nm = json_object_get(c->root, "_name_or_path");
    if (json_is_string(nm)) snprintf(cfg->name, sizeof(cfg->name), "%s", json_string_value(nm));

    json_t *act = json_object_get(c->root, "hidden_act");
    if (act && !json_is_null(act) &&
        !(json_is_string(act) && strcmp(json_string_value(act), "silu") == 0))
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s: hidden_act '%s' is not supported (the MLP is SwiGLU with silu)",
                        c->src, json_is_string(act) ? json_string_value(act) : "?");

    CP_CHECK(get_int(c, "vocab_size", true, 0, 1, &cfg->n_vocab));
    CP_CHECK(get_int(c, "hidden_size", true, 0, 1, &cfg->dim));
    CP_CHECK(get_int(c, "num_hidden_layers", true, 0, 1, &cfg->n_layer));
    CP_CHECK(get_int(c, "num_attention_heads", true, 0, 1, &cfg->n_head));
    CP_CHECK(get_int(c, "intermediate_size", true, 0, 1, &cfg->ffn_dim));
    CP_CHECK(get_int(c, "num_key_value_heads", false, cfg->n_head, 1, &cfg->n_head_kv));
    if (cfg->n_head % cfg->n_head_kv != 0)
        return CP_ERROR(CP_ERR_FORMAT,
                        "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads "
                        "(%d)",
                        c->src, cfg->n_head, cfg->n_head_kv);
    json_t *hd = json_object_get(c->root, "head_dim");
    if (!hd || json_is_null(hd)) {
        if (cfg->dim % cfg->n_head != 0)
            return CP_ERROR(CP_ERR_FORMAT,
                            "%s: hidden_size (%d) is not a multiple of num_attention_heads (%d) "
                            "and no head_dim is given",
                            c->src, cfg->dim, cfg->n_head);
        cfg->head_dim = cfg->dim / cfg->n_head;
    } else {
        CP_CHECK(get_int(c, "head_dim", true, 0, 2, &cfg->head_dim));
    }
    if (cfg->head_dim % 2 != 0)
        return CP_ERROR(CP_ERR_FORMAT, "%s: head dimension %d is odd; RoPE needs it even", c->src,
                        cfg->head_dim);
    /* Defaults of transformers' configuration classes. */
    int dflt_ctx = is_qwen2 ? 32768 : is_mistral ? 4096 * 32 : 2048;
    CP_CHECK(get_int(c, "max_position_embeddings", false, dflt_ctx, 1, &cfg->ctx_train));

    double eps, theta;
    CP_CHECK(get_pos_num(c, c->root, "rms_norm_eps", false, 1e-6, &eps));
    CP_CHECK(get_pos_num(c, c->root, "rope_theta", false, 10000.0, &theta));
    cfg->norm_eps = (float)eps;
    cfg->rope_theta = (float)theta;
    cfg->rope_mode = CP_ROPE_HALF;
    cfg->rot_dim = cfg->head_dim;
    cfg->rope_freq_scale = 1.0f;
    CP_CHECK(get_rope_scaling(c, cfg));

    CP_CHECK(get_bool(c, "tie_word_embeddings", false, &cfg->tied_embeddings));
    bool attn_bias = false, mlp_bias = false;
    CP_CHECK(get_bool(c, "attention_bias", false, &attn_bias));
    CP_CHECK(get_bool(c, "mlp_bias", false, &mlp_bias));
    if (!is_qwen2 && attn_bias)
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s: attention_bias = true (a bias on the output projection too) is not "
                        "supported",
                        c->src);
    if (mlp_bias)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "%s: mlp_bias = true is not supported", c->src);
    cfg->qkv_bias = is_qwen2; /* Qwen2 always has Q/K/V biases and no others */

    /* Within the window, sliding-window attention equals full attention. */
    bool sliding = is_mistral;
    if (is_qwen2) CP_CHECK(get_bool(c, "use_sliding_window", false, &sliding));
    if (sliding) {
        int win;
        CP_CHECK(get_int(c, "sliding_window", false, 0, 0, &win));
        if (win > 0 && win < cfg->ctx_train) cfg->ctx_train = win;
    }
    return CP_OK;
}

/* Parses len bytes of JSON from src (named in the error) into *root (the
 * caller's reference). */
static cp_status load_json(const char *json, size_t len, const char *src, json_t **root) {
    json_error_t jerr;
    *root = json_loadb(json, len, 0, &jerr);
    if (!*root)
        return CP_ERROR(CP_ERR_FORMAT, "%s is not valid JSON: %s (line %d, column %d)", src, jerr.text,
                        jerr.line, jerr.column);
    return CP_OK;
}

cp_status cp_hf_config_parse(const char *json, size_t len, const char *source,
                             cp_model_config *cfg) {
    if (!json || !cfg) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_hf_config_parse: NULL argument");
    const char *src = source ? source : "config.json";
    json_t *root;
    CP_CHECK(load_json(json, len, src, &root));
    cp_status s;
    if (!json_is_object(root)) {
        s = CP_ERROR(CP_ERR_FORMAT, "%s is not a JSON object", src);
    } else {
        hf_ctx c = {root, src};
        s = parse_root(&c, cfg);
    }
    json_decref(root);
    return s;
}

/* Reads the file at path (or at path/config.json when path is a directory)
 * into *text (malloc'd, *len bytes); *used gets the path read (malloc'd).
 * With missing_ok, a file that does not exist gives CP_OK and *text NULL. */
static cp_status read_text(const char *path, bool missing_ok, char **text, size_t *len,
                           char **used) {
    cp_status s = CP_OK;
    char *p = NULL, *t = NULL;
    FILE *f = NULL;
    struct stat sb;
    *text = NULL;
    *len = 0;
    *used = NULL;
    const bool dir = stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
    const size_t n = strlen(path);
    p = malloc(n + sizeof("/config.json"));
    if (!p) return CP_ERROR(CP_ERR_OOM, "out of memory reading %s", path);
    memcpy(p, path, n + 1);
    if (dir) memcpy(p + n, "/config.json", sizeof("/config.json"));
    f = fopen(p, "rb");
    if (!f) {
        if (missing_ok && errno == ENOENT) goto fail;
        s = CP_ERROR(CP_ERR_IO, "cannot open %s: %s", p, strerror(errno));
        goto fail;
    }
    long fsize = -1;
    if (fseek(f, 0, SEEK_END) == 0) fsize = ftell(f);
    if (fsize < 0 || fseek(f, 0, SEEK_SET) != 0) {
        s = CP_ERROR(CP_ERR_IO, "cannot read %s: %s", p, strerror(errno));
        goto fail;
    }
    if ((unsigned long)fsize > HF_MAX_CONFIG) {
        s = CP_ERROR(CP_ERR_FORMAT, "%s is larger than %u bytes: not a configuration file", p,
                     HF_MAX_CONFIG);
        goto fail;
    }
    t = malloc((size_t)fsize + 1);
    if (!t) {
        s = CP_ERROR(CP_ERR_OOM, "out of memory reading %s", p);
        goto fail;
    }
    if (fread(t, 1, (size_t)fsize, f) != (size_t)fsize) {
        s = CP_ERROR(CP_ERR_IO, "cannot read %s: %s", p, strerror(errno));
        goto fail;
    }
    fclose(f);
    *text = t;
    *len = (size_t)fsize;
    *used = p;
    return CP_OK;
fail:
    if (f) fclose(f);
    free(t);
    free(p);
    return s;
}

cp_status cp_hf_config_load(const char *config_json_path, cp_model_config *cfg) {
    if (!config_json_path || !cfg)
        return CP_ERROR(CP_ERR_INVALID_ARG, "cp_hf_config_load: NULL argument");
    char *text = NULL, *p = NULL;
    size_t len = 0;
    CP_CHECK(read_text(config_json_path, false, &text, &len, &p));
    cp_status s = cp_hf_config_parse(text, len, p, cfg);
    free(text);
    free(p);
    return s;
}

/* ---- quantization_config -------------------------------------------------- */

/* The first of keys (NULL-terminated) that obj has with a non-null value. */
static json_t *get_alias(json_t *obj, const char *const *keys, const char **which) {
    for (; *keys; keys++) {
        json_t *v = json_object_get(obj, *keys);
        if (v && !json_is_null(v)) {
            *which = *keys;
            return v;
        }
    }
    return NULL;
}

static cp_status quant_bool(const hf_ctx *c, json_t *obj, const char *key, bool dflt, bool *out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return CP_OK;
    }
    if (!json_is_boolean(v))
        return CP_ERROR(CP_ERR_FORMAT, "%s: quantization setting \"%s\" is not true or false",
                        c->src, key);
    *out = json_is_true(v);
    return CP_OK;
}

/* A string setting, compared without regard to case; NULL when absent. */
static cp_status quant_str(const hf_ctx *c, json_t *obj, const char *const *keys,
                           const char **out) {
    const char *which = keys[0];
    json_t *v = get_alias(obj, keys, &which);
    *out = NULL;
    if (!v) return CP_OK;
    if (!json_is_string(v))
        return CP_ERROR(CP_ERR_FORMAT, "%s: quantization setting \"%s\" is not a string", c->src,
                        which);
    *out = json_string_value(v);
    return CP_OK;
}

static cp_status quant_int(const hf_ctx *c, json_t *obj, const char *const *keys, json_int_t *out) {
    const char *which = keys[0];
    json_t *v = get_alias(obj, keys, &which);
    if (!v)
        return CP_ERROR(CP_ERR_FORMAT, "%s: quantization setting \"%s\" is missing", c->src,
                        keys[0]);
    if (!json_is_integer(v))
        return CP_ERROR(CP_ERR_FORMAT, "%s: quantization setting \"%s\" is not an integer", c->src,
                        which);
    *out = json_integer_value(v);
    return CP_OK;
}

static cp_status parse_quant(const hf_ctx *c, json_t *qc, cp_hf_quant_method dflt,
                             cp_hf_quant_config *q) {
    static const char *const k_method[] = {"quant_method", NULL};
    static const char *const k_bits[] = {"bits", "w_bit", NULL};
    static const char *const k_group[] = {"group_size", "q_group_size", NULL};
    static const char *const k_version[] = {"version", NULL};
    static const char *const k_format[] = {"checkpoint_format", "format", NULL};
    const char *method = NULL;
    CP_CHECK(quant_str(c, qc, k_method, &method));
    if (!method && dflt == CP_HF_QUANT_NONE)
        return CP_ERROR(CP_ERR_FORMAT, "%s: quantization_config has no \"quant_method\"", c->src);
    if (!method) {
        q->method = dflt;
    } else if (strcasecmp(method, "awq") == 0) {
        q->method = CP_HF_QUANT_AWQ;
    } else if (strcasecmp(method, "gptq") == 0) {
        q->method = CP_HF_QUANT_GPTQ;
    } else {
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s: quant_method '%s' is not supported (4-bit awq and gptq are)", c->src,
                        method);
    }
    const char *name = q->method == CP_HF_QUANT_AWQ ? "AWQ" : "GPTQ";
    json_int_t bits, group;
    CP_CHECK(quant_int(c, qc, k_bits, &bits));
    if (bits != 4)
        return CP_ERROR(CP_ERR_UNSUPPORTED, "%s: %s bits = %lld is not supported (only 4 bits are)",
                        c->src, name, (long long)bits);
    CP_CHECK(quant_int(c, qc, k_group, &group));
    if (group != -1 && (group < 1 || group > INT_MAX))
        return CP_ERROR(CP_ERR_FORMAT, "%s: %s group_size = %lld is out of range (> 0, or -1)",
                        c->src, name, (long long)group);
    q->bits = 4;
    q->group_size = (int)group;
    CP_CHECK(quant_bool(c, qc, "sym", true, &q->sym));
    CP_CHECK(quant_bool(c, qc, "desc_act", false, &q->desc_act));
    if (q->method == CP_HF_QUANT_AWQ) {
        const char *version = NULL;
        CP_CHECK(quant_str(c, qc, k_version, &version));
        if (version && strcasecmp(version, "gemm") != 0)
            return CP_ERROR(CP_ERR_UNSUPPORTED,
                            "%s: AWQ version '%s' is not supported (the gemm layout is)", c->src,
                            version);
        bool zp = true;
        CP_CHECK(quant_bool(c, qc, "zero_point", true, &zp));
        q->sym = !zp;
        q->zero_minus_one = false;
        return CP_OK;
    }
    const char *format = NULL;
    bool marlin = false;
    CP_CHECK(quant_str(c, qc, k_format, &format));
    CP_CHECK(quant_bool(c, qc, "is_marlin_format", false, &marlin));
    if (marlin) format = "marlin";
    if (!format || strcasecmp(format, "gptq") == 0) {
        q->zero_minus_one = true;
    } else if (strcasecmp(format, "gptq_v2") == 0) {
        q->zero_minus_one = false;
    } else {
        return CP_ERROR(CP_ERR_UNSUPPORTED,
                        "%s: GPTQ checkpoint format '%s' is not supported (gptq and gptq_v2 are)",
                        c->src, format);
    }
    return CP_OK;
}

cp_status cp_hf_quant_config_parse(const char *json, size_t len, const char *source,
                                   bool whole_is_quant, cp_hf_quant_method default_method,
                                   cp_hf_quant_config *q) {
    if (!json || !q) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_hf_quant_config_parse: NULL argument");
    memset(q, 0, sizeof(*q));
    const char *src = source ? source : "config.json";
    json_t *root;
    CP_CHECK(load_json(json, len, src, &root));
    cp_status s = CP_OK;
    hf_ctx c = {root, src};
    json_t *qc = whole_is_quant ? root : json_object_get(root, "quantization_config");
    if (!json_is_object(root)) {
        s = CP_ERROR(CP_ERR_FORMAT, "%s is not a JSON object", src);
    } else if (qc && !json_is_null(qc)) {
        if (!json_is_object(qc))
            s = CP_ERROR(CP_ERR_FORMAT, "%s: \"quantization_config\" is not an object or null",
                         src);
        else
            s = parse_quant(&c, qc, default_method, q);
    }
    if (s != CP_OK) memset(q, 0, sizeof(*q));
    json_decref(root);
    return s;
}

cp_status cp_hf_quant_config_load(const char *dir, cp_hf_quant_config *q) {
    if (!dir || !q) return CP_ERROR(CP_ERR_INVALID_ARG, "cp_hf_quant_config_load: NULL argument");
    memset(q, 0, sizeof(*q));
    /* config.json first (transformers writes quantization_config there), then
     * the files the quantizers themselves write beside it */
    static const struct {
        const char *file;
        bool whole;
        cp_hf_quant_method dflt;
    } where[] = {
        {"config.json", false, CP_HF_QUANT_NONE},
        {"quantize_config.json", true, CP_HF_QUANT_GPTQ},
        {"quant_config.json", true, CP_HF_QUANT_AWQ},
    };
    const size_t n = strlen(dir);
    char *path = malloc(n + 32);
    if (!path) return CP_ERROR(CP_ERR_OOM, "out of memory reading %s", dir);
    cp_status s = CP_OK;
    for (size_t i = 0; i < sizeof(where) / sizeof(where[0]) && s == CP_OK; i++) {
        snprintf(path, n + 32, "%s/%s", dir, where[i].file);
        char *text = NULL, *used = NULL;
        size_t len = 0;
        s = read_text(path, true, &text, &len, &used);
        if (s == CP_OK && text)
            s = cp_hf_quant_config_parse(text, len, used, where[i].whole, where[i].dflt, q);
        free(text);
        free(used);
        if (q->method != CP_HF_QUANT_NONE) break;
    }
    free(path);
    return s;
}
