#!/usr/bin/env python3
"""Reference token ids for the default model's tokenizer from the Hugging Face
`tokenizers` package, and its chat prompt rendered by jinja2.

Builds a tokenizer.json equivalent to SmolLM2's (vocab + merges + special
tokens from the GGUF file; pre-tokenizer Digits(individual) + ByteLevel, as in
the published SmolLM2 tokenizer), encodes the test strings with it and writes
tests/golden/smollm2_hf_cases.json: {"cases": [{"text", "ids": {pre: [...]}}],
"chat": ...}. The same vocabulary is also run through the pre-tokenizers of
the other GGUF "pre" types (gpt2, llama3, qwen2, default) so that every
hand-written matcher is checked against a regex engine.
The C++ test rebuilds the same tokenizer.json from the GGUF itself, so nothing
multi-megabyte is committed.

    pip install gguf tokenizers jinja2
    python3 tests/golden/make_hf_tokenizer_fixture.py [model.gguf] [out.json]
"""
import json
import os
import sys

import gguf
import jinja2
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Shared with the C++ test through the output file.
TEXTS = [
    "",
    " ",
    "  leading",
    "Hello world",
    "Hello, world! 123 4567",
    "\u00ef\u00fc\u00e9 \u65e5\u672c\u8a9e \U0001f999",
    "tabs\tand\nnewlines\n\n",
    "<|im_start|>user\nHi<|im_end|>",
    "don't I'll we've",
    "3.14159",
    "int main() { return 0; }",
    "a" * 1000,
    "   ",
    "trailing spaces   ",
    "a  b   c    d",
    "x \ty",
    "line1\r\nline2",
    "DON'T SHOUT, it's O'Neil's",
    "'s 're 've 'm 'll 'd 't",
    "\u00bd \u00b2 \u0663\u0664 \u2167 1\u00bd",
    "caf\u00e9 cafe\u0301 na\u00efve",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0645\u0631\u062d\u0628\u0627",
    "\U0001f600\U0001f44d\U0001f3fd \u2764\ufe0f",
    "emoji\u200dzwj and\u00a0nbsp\u2003em space",
    "<|im_end|><|im_start|>assistant\n",
    "<|endoftext|> text <|im_end|>x",
    "def f(x):\n    return x**2  # square\n",
    "https://example.com/path?q=1&r=2#frag",
    "$100.00 + 15% = ???",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c\u3002\u4f60\u597d\uff01",
    "\x00\x01\x7f control",
    "UPPER lower MiXeD",
    # whitespace / newline / punctuation mixtures where the pre types differ
    "\n\n\n",
    "a\n\n  b",
    "  \n  x",
    "foo:\n\tbar",
    "x  \n",
    "!!!\n\nnext",
    "(hello) [world] {x}",
    " 'tis I'M HE'LL",
    "end.\r\n\r\n",
    "12345678901 x1y22z333",
]


# Published chat templates of other model families (from their
# tokenizer_config.json files) rendered the way transformers does; the C++
# test checks that the format recognised from each template reproduces them.
CHAT_TEMPLATES = {
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
               "<|begin_of_text|>", "<|eot_id|>", True),
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message "
               "= messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false "
               "%}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
               "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
               "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
               "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
               "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + "
               "' ' + eos_token }}{% endif %}{% endfor %}",
               "<s>", "</s>", True),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == "
                "0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
                "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception("
                "'Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
                "<s>", "</s>", False),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') "
              "}}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = "
              "message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
              "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
              "<bos>", "<eos>", False),
    "phi3": ("{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
             "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
             "{{ eos_token }}{% endif %}",
             "<s>", "<|endoftext|>", True),
    "zephyr": ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
               "+ eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
               "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
               "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
               "{% endif %}\n{% endfor %}",
               "<s>", "</s>", True),
}

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]


def render_formats():
    # transformers renders with trim_blocks and lstrip_blocks
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    out = []
    for name, (tmpl, bos, eos, with_system) in CHAT_TEMPLATES.items():
        msgs = CONVERSATION if with_system else CONVERSATION[1:]
        text = env.from_string(tmpl).render(messages=msgs, add_generation_prompt=True, bos_token=bos,
                                            eos_token=eos)
        # the runtime leaves the leading BOS to the tokenizer (add_special)
        if text.startswith(bos):
            text = text[len(bos):]
        out.append({"name": name, "template": tmpl, "eos": eos, "messages": msgs,
                    "add_generation_prompt": True, "text": text})
    return out


def read_gguf(path):
    r = gguf.GGUFReader(path)

    def strs(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(key):
        f = r.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    tmpl_f = r.fields["tokenizer.chat_template"]
    return {
        "tokens": strs("tokenizer.ggml.tokens"),
        "types": ints("tokenizer.ggml.token_type"),
        "merges": strs("tokenizer.ggml.merges"),
        "template": bytes(tmpl_f.parts[tmpl_f.data[0]]).decode("utf-8"),
    }


RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
RE_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
RE_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")


def split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

# Pre-tokenizers of the GGUF "pre" types, written as Hugging Face pipelines.
# "smollm" is the published SmolLM2 setup; "default" mirrors llama.cpp's
# fallback list of regexes (each Split keeps matches and gaps, like llama.cpp).
PRE_VARIANTS = {
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}, False),
    "gpt2": ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, False),
    "llama3": ({"type": "Sequence", "pretokenizers": [split(RE_LLAMA3), BYTE_LEVEL_NO_REGEX]}, True),
    "qwen2": ({"type": "Sequence", "pretokenizers": [split(RE_QWEN2), BYTE_LEVEL_NO_REGEX]}, False),
    "default": ({"type": "Sequence", "pretokenizers": [
        split(r"[\p{P}\$\+<=>\^~\|]+"), split(RE_GPT2), split(r"\p{N}+"), split(r"[0-9][0-9][0-9]"),
        BYTE_LEVEL_NO_REGEX]}, False),
}


def tokenizer_json(m, pre="smollm"):
    pre_tok, ignore_merges = PRE_VARIANTS[pre]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(m["tokens"], m["types"])) if ty == 3]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": {t: i for i, t in enumerate(m["tokens"])}, "merges": m["merges"]},
    }


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "smollm2_hf_cases.json")
    m = read_gguf(model)
    toks = {pre: Tokenizer.from_str(json.dumps(tokenizer_json(m, pre))) for pre in PRE_VARIANTS}
    cases = []
    for t in TEXTS:
        ids = {}
        for pre, tok in toks.items():
            ids[pre] = tok.encode(t, add_special_tokens=False).ids
            assert tok.decode(ids[pre], skip_special_tokens=False) == t, (pre, repr(t))
        cases.append({"text": t, "ids": ids})
    env = jinja2.Environment()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = env.from_string(m["template"]).render(messages=msgs, add_generation_prompt=True)
    msgs2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    chat2 = env.from_string(m["template"]).render(messages=msgs2, add_generation_prompt=False)
    doc = {
        "generator": "tests/golden/make_hf_tokenizer_fixture.py",
        "model": os.path.basename(model),
        "cases": cases,
        "chat": [{"messages": msgs, "add_generation_prompt": True, "text": chat},
                 {"messages": msgs2, "add_generation_prompt": False, "text": chat2}],
        "chat_formats": render_formats(),
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=True, indent=None)
        f.write("\n")
    print("wrote %s (%d cases)" % (out, len(cases)))


if __name__ == "__main__":
    main()
