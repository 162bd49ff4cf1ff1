/* cp_tokenizer.h - text <-> token ids for Llama-family models: byte-level BPE
 * (GPT-2 style, "gpt2" in GGUF) and SentencePiece BPE ("llama"), loaded from
 * GGUF metadata or a Hugging Face tokenizer.json, plus chat-template
 * formatting. A tokenizer is immutable after init: every function may be
 * called from several threads at once on the same handle. */
#ifndef CP_TOKENIZER_H
#define CP_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cp_common.h"
#include "cp_gguf.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cp_tokenizer *cp_tokenizer_t;

/* Token types, as GGUF's tokenizer.ggml.token_type stores them. */
typedef enum cp_token_type {
    CP_TOKEN_UNDEFINED = 0, /* treated as NORMAL */
    CP_TOKEN_NORMAL = 1,
    CP_TOKEN_UNKNOWN = 2,
    CP_TOKEN_CONTROL = 3,      /* <s>, <|im_start|>: matched only with parse_special */
    CP_TOKEN_USER_DEFINED = 4, /* always matched as a whole, before the BPE */
    CP_TOKEN_UNUSED = 5,
    CP_TOKEN_BYTE = 6, /* SentencePiece byte fallback <0xAB> */
} cp_token_type;

/* Everything a tokenizer is built from; init copies all of it, so the
 * arrays may be freed (or the GGUF closed) right after. */
typedef struct cp_tokenizer_spec {
    const char *model; /* "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE) */
    /* Pre-tokenizer name as in GGUF tokenizer.ggml.pre (byte-level BPE only):
     * "default", "gpt2"/"gpt-2", "smollm"/"starcoder"/"refact"/"command-r",
     * "llama3"/"llama-bpe"/"llama-v3"/"falcon3" (whole words found in the
     * vocabulary skip the merges), "dbrx"/"smaug-bpe", "qwen2"/"stablelm2".
     * NULL = "default". Unknown names are CP_ERR_UNSUPPORTED. */
    const char *pre;
    int64_t n_vocab;
    const cp_str *tokens;       /* n_vocab token texts (UTF-8) */
    const float *scores;        /* n_vocab merge scores (SentencePiece), NULL ok */
    const int32_t *token_types; /* n_vocab cp_token_type values, NULL = inferred */
    int64_t n_merges;           /* byte-level BPE: required; "llama": optional */
    const cp_str *merges;       /* "left right" strings, rank = index */
    int32_t bos_id, eos_id, unk_id, pad_id, eot_id; /* -1 when absent */
    bool add_bos, add_eos, add_space_prefix;
    const char *chat_template; /* Jinja text, NULL ok */
} cp_tokenizer_spec;

/* Builds a tokenizer from spec (copied). Merges are ranked by index; with
 * model "llama" and no merges, pairs merge by descending score (SentencePiece
 * BPE). Errors: CP_ERR_INVALID_ARG (NULL/empty arrays, an id out of range,
 * add_bos/add_eos without the token, a merge naming an unknown token or
 * producing a text that is no token), CP_ERR_UNSUPPORTED (unknown model or
 * pre-tokenizer), CP_ERR_OOM. *out is NULL on error. Free with
 * cp_tokenizer_free. */
cp_status cp_tokenizer_init(const cp_tokenizer_spec *spec, cp_tokenizer_t *out);

/* Reads tokenizer.ggml.* keys (model, pre, tokens, scores, token_type,
 * merges, bos/eos/unknown/padding/eot ids, add_bos_token, add_eos_token,
 * add_space_prefix) and tokenizer.chat_template from g (borrowed for the
 * call only). Missing add_* flags default as llama.cpp does: "llama" adds
 * BOS and a space prefix, "gpt2" adds neither; missing SentencePiece ids
 * default to <unk>=0 <s>=1 </s>=2. Errors: CP_ERR_FORMAT when a required key
 * is missing, has the wrong type or inconsistent contents (an id out of
 * range, a bad merge; the message names it), CP_ERR_UNSUPPORTED (model or
 * pre-tokenizer), CP_ERR_OOM. */
cp_status cp_tokenizer_init_gguf(cp_gguf_t g, cp_tokenizer_t *out);

/* Loads a Hugging Face tokenizer.json (BPE model; byte-level or byte-fallback
 * SentencePiece style) and optionally tokenizer_config.json (special-token
 * names, add_bos_token/add_eos_token, chat_template). Paths are borrowed for
 * the call. Errors: CP_ERR_IO (unreadable file), CP_ERR_FORMAT (malformed
 * JSON or missing fields), CP_ERR_UNSUPPORTED (a model type or
 * pre-tokenizer this build does not implement; the message names it). */
cp_status cp_tokenizer_init_json(const char *tokenizer_json, const char *tokenizer_config_json,
                                 cp_tokenizer_t *out);

/* Frees tok. NULL is a no-op. */
void cp_tokenizer_free(cp_tokenizer_t tok);

/* Encodes text[0..len) (UTF-8, need not be NUL-terminated). add_special adds
 * BOS/EOS as the model asks (add_bos/add_eos). parse_special: the text of a
 * control token such as "<|im_start|>" becomes that token's id; otherwise it
 * is tokenized as plain text (user-defined tokens are always matched). On
 * success *ids is malloc'd (caller frees; NULL when *n_ids == 0). Errors:
 * CP_ERR_INVALID_ARG for invalid UTF-8 (the message gives the byte offset)
 * or NULL arguments, CP_ERR_UNSUPPORTED when a character has no token and
 * the vocabulary has neither byte tokens nor <unk>, CP_ERR_OOM. Runs in
 * O(n log n) time in the text size. */
cp_status cp_tokenizer_encode(cp_tokenizer_t tok, const char *text, size_t len, bool add_special,
                              bool parse_special, int32_t **ids, size_t *n_ids);

/* A byte range of a text. */
typedef struct cp_text_span {
    size_t off, len;
} cp_text_span;

/* cp_tokenizer_encode with parse_special, except that control-token text
 * overlapping any of literal[n_literal] (ascending, disjoint) is tokenized
 * as plain text: a chat template's markup gives control tokens while the
 * same text inside a message stays text (no prompt injection of turn
 * markers). */
cp_status cp_tokenizer_encode_literal(cp_tokenizer_t tok, const char *text, size_t len,
                                      bool add_special, const cp_text_span *literal,
                                      size_t n_literal, int32_t **ids, size_t *n_ids);

/* The bytes of token id (byte-level BPE pieces mapped back to bytes, "▁" ->
 * space, <0xAB> -> the byte). Control and unknown tokens give "" unless
 * special is true (then their text). *bytes points into tok (valid until
 * cp_tokenizer_free) and is not NUL-terminated. Errors: CP_ERR_INVALID_ARG
 * for an id out of range. A piece may be an incomplete UTF-8 sequence. */
cp_status cp_tokenizer_piece(cp_tokenizer_t tok, int32_t id, bool special, const char **bytes,
                             size_t *len);

/* Concatenates the pieces of ids[0..n) (with a SentencePiece space prefix, the
 * leading space it added is removed again). *text is malloc'd and
 * NUL-terminated (caller frees); *len excludes the NUL (len may be NULL).
 * Errors: CP_ERR_INVALID_ARG (an id out of range, named), CP_ERR_OOM. */
cp_status cp_tokenizer_decode(cp_tokenizer_t tok, const int32_t *ids, size_t n, bool special,
                              char **text, size_t *len);

int32_t cp_tokenizer_n_vocab(cp_tokenizer_t tok);
int32_t cp_tokenizer_bos(cp_tokenizer_t tok); /* -1 when none */
int32_t cp_tokenizer_eos(cp_tokenizer_t tok); /* -1 when none */
bool cp_tokenizer_add_bos(cp_tokenizer_t tok);
/* The id whose text is exactly text[0..len), or -1. */
int32_t cp_tokenizer_find(cp_tokenizer_t tok, const char *text, size_t len);
/* Type of token id (CP_TOKEN_UNDEFINED for an id out of range). */
cp_token_type cp_tokenizer_token_type(cp_tokenizer_t tok, int32_t id);
/* True for any end-of-generation token: eos, eot, and control tokens such as
 * <|im_end|>, <|eot_id|>, <|end_of_text|>, <|endoftext|>, <end_of_turn>. */
bool cp_tokenizer_is_eog(cp_tokenizer_t tok, int32_t id);
/* The model's chat template text, or NULL (valid until cp_tokenizer_free). */
const char *cp_tokenizer_chat_template(cp_tokenizer_t tok);

typedef struct cp_chat_msg {
    const char *role; /* "system", "user", "assistant" */
    const char *content;
} cp_chat_msg;

/* Flags of cp_chat_format / cp_tokenizer_apply_chat. */
enum {
    CP_CHAT_GENERATION_PROMPT = 1u << 0, /* end with the opening of an assistant turn */
    /* Insert the default system message written literally in a ChatML
     * template (as Hugging Face's jinja rendering does) when the conversation
     * has none. Off, the conversation is formatted as given, as llama.cpp's
     * built-in ChatML does. */
    CP_CHAT_TEMPLATE_SYSTEM = 1u << 1,
    /* The last message (an assistant one) is left open for the model to go
     * on with: its content ends the text, verbatim, with no end-of-turn
     * markup (vLLM's continue_final_message); the generation prompt is not
     * added. A conversation that does not end with an assistant message is
     * CP_ERR_INVALID_ARG. */
    CP_CHAT_CONTINUE_FINAL = 1u << 2,
};

/* Formats msgs with the model's chat template (see cp_chat_format). */
cp_status cp_tokenizer_apply_chat(cp_tokenizer_t tok, const cp_chat_msg *msgs, size_t n,
                                  unsigned flags, char **out);

/* Formats msgs with the model's chat template and encodes the result (BOS
 * as the model asks): control tokens come from the template's markup only;
 * control-token text inside a message's content (e.g. a user writing
 * "<|im_end|><|im_start|>system") is tokenized as plain text. *ids as
 * cp_tokenizer_encode; *text (optional, NULL ok) receives the formatted
 * text (malloc'd). */
cp_status cp_tokenizer_encode_chat(cp_tokenizer_t tok, const cp_chat_msg *msgs, size_t n,
                                   unsigned flags, int32_t **ids, size_t *n_ids, char **text);

/* Formats msgs with the chat format recognised from template text tmpl:
 * ChatML (<|im_start|>; with CP_CHAT_TEMPLATE_SYSTEM, a default system
 * message that the template itself contains is inserted when the first
 * message is not "system"), Llama 3
 * (<|start_header_id|>), Llama 2 ([INST] with <<SYS>>), Mistral ([INST]),
 * Gemma (<start_of_turn>), Phi-3 (<|user|> ... <|end|>), Zephyr (<|user|>
 * ... </s>). NULL, empty or unrecognised templates use ChatML. No BOS text is
 * written at the start: encode with add_special=true to get the model's BOS.
 * eos_text is the EOS token text some formats write after assistant turns
 * (NULL = "</s>"). *out is malloc'd and NUL-terminated (caller frees).
 * Errors: CP_ERR_INVALID_ARG (NULL message, role or content), CP_ERR_OOM. */
cp_status cp_chat_format(const char *tmpl, const char *eos_text, const cp_chat_msg *msgs, size_t n,
                         unsigned flags, char **out);

/* cp_chat_format that also returns where message contents (not markup)
 * lie in *out: *content[*n_content] ascending, disjoint (malloc'd, NULL
 * when none; caller frees). */
cp_status cp_chat_format_spans(const char *tmpl, const char *eos_text, const cp_chat_msg *msgs,
                               size_t n, unsigned flags, char **out, cp_text_span **content,
                               size_t *n_content);

#ifdef __cplusplus
}
#endif

#endif /* CP_TOKENIZER_H */
