#!/usr/bin/env python3
"""Write the llama.cpp reference files that anchor cparallel's CPU model.

Produces tokenizer_cases.json (token ids for tricky strings) and
smollm2_golden.json (prompt ids, 32 greedy tokens, per-position top-10 logits
and logsumexp) from llama-cpp-python. Run with the interpreter of the venv
that holds llama-cpp-python; see README.md in this folder.
"""

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

try:
    import jinja2
    import llama_cpp
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(f"make_golden.py: {e}; run it with the llama-cpp-python venv "
             "(e.g. /opt/llamacpp/bin/python)")

HERE = os.path.dirname(os.path.abspath(__file__))
N_GEN = 32
TOP_K = 10
LOGIT_DECIMALS = 5
GGML_TYPE_F32 = 0

# Settings passed to llama_cpp.Llama for the logits file. Everything not
# listed here is left at llama-cpp-python's default.
LLAMA_SETTINGS = dict(n_ctx=2048, logits_all=True, n_threads=2, seed=0)

# ~200-token paragraph (original text written for this fixture).
PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, "
    "carrying a tin of oil, a clean cloth and a notebook in which she wrote "
    "the time, the wind and the colour of the sea. Ships no longer needed "
    "her lamp; their screens showed every rock and sandbar along the coast. "
    "Still, the harbour council voted each spring to keep the light burning, "
    "partly out of habit and partly because the fishermen said that a dark "
    "tower made the bay feel empty. Over thirty years her notebooks filled "
    "two shelves of the keeper's cottage. When a student from the university "
    "asked to read them, she expected boredom. Instead he found a record of "
    "storms that no instrument had kept: the night in 1994 when the waves "
    "reached the second window, the winter the ice came into the harbour, "
    "and the quiet August when the water turned a strange green for eleven "
    "days. He copied the entries into a table, compared them with the "
    "weather service's measurements, and discovered that"
)

PROMPTS = [
    ("capital", "The capital of France is"),
    ("fibonacci", "def fibonacci(n):"),
    ("once_upon", "Once upon a time"),
    ("numbers", "1, 2, 3, 5, 8, 13,"),
    ("paragraph", PARAGRAPH),
]
CHAT_QUESTION = "What is the capital of France?"

TOKENIZER_TEXTS = [
    "",
    " ",
    "  leading spaces",
    "Hello world",
    " Hello world",
    "Hello, world! 123 4567",
    "\u00ef\u00fc\u00e9 \u65e5\u672c\u8a9e \U0001f999",
    "tabs\tand\nnewlines\n\n",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>after end",
    "don't I'll we've WE'LL they'D it's",
    "3.14159 and 1000000",
    "12345678901234567890",
    "int main() { return 0; }",
    "def f(x):\n    return x ** 2  # square\n",
    "a" * 1000,
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! "
    "\u041a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002",
    "many          spaces   between    words",
    "trailing spaces   ",
    "\r\n",
    "line one\r\nline two\r\n",
    "!!!???...",
    "Wait... what?!? (yes) [no] {maybe}",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M?x=1&y=two#frag",
    "email: someone@example.com",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
    "\U0001f44d\U0001f3fd \U0001f1eb\U0001f1f7 \u2764\ufe0f",
    "caf\u00e9 vs cafe\u0301",
    "\u00a0non-breaking\u00a0space",
    "\t\t\tindented",
    "\n\n\n",
    "MixedCASE camelCase snake_case kebab-case",
    "$100.00 = 100% \u20ac50 \u00a330",
    "<html><body>Hi</body></html>",
    "x" + " " * 20 + "y",
    "\u2581already sentencepiece-ish",
]

# Strings containing special-token text are tokenized both ways.
SPECIAL_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def gguf_string(reader, key):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def generator_string():
    return f"llama-cpp-python {llama_cpp.__version__}"


# llama.cpp commit vendored by each llama-cpp-python release we have used
# (from the package's CHANGELOG.md); the installed package does not record it.
VENDORED_LLAMA_CPP = {"0.3.36": "ggml-org/llama.cpp@0c1e57098"}


def llama_cpp_commit():
    return VENDORED_LLAMA_CPP.get(llama_cpp.__version__, "")


def make_tokenizer_cases(model_path):
    vocab = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    cases = []
    for text in TOKENIZER_TEXTS:
        modes = [False]
        if any(m in text for m in SPECIAL_MARKERS):
            modes = [True, False]
        for parse_special in modes:
            ids = vocab.tokenize(text.encode("utf-8"), add_bos=False,
                                 special=parse_special)
            cases.append({"text": text, "add_special": False,
                          "parse_special": parse_special, "ids": list(ids)})
    del vocab
    return cases


def render_chat(template_src, question, bos, eos):
    env = jinja2.Environment(loader=jinja2.BaseLoader(),
                             keep_trailing_newline=True)
    tmpl = env.from_string(template_src)
    return tmpl.render(messages=[{"role": "user", "content": question}],
                       add_generation_prompt=True, bos_token=bos,
                       eos_token=eos)


def top_k_row(row, k):
    # Stable ordering: logit descending, then token id ascending, so ties
    # (possible after rounding) never reorder between runs.
    idx = np.argsort(-row, kind="stable")[:k]
    return [[int(i), round(float(row[i]), LOGIT_DECIMALS)] for i in idx]


def logsumexp(row):
    r = row.astype(np.float64)
    m = float(np.max(r))
    return m + math.log(float(np.sum(np.exp(r - m))))


def run_prompt(llm, name, text, parse_special):
    prompt_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=False,
                                   special=parse_special))
    llm.reset()
    llm.eval(prompt_ids)
    generated = []
    margins = []
    for _ in range(N_GEN):
        row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        # Pure greedy: argmax of the raw logits, lowest id on ties.
        tok = int(np.argmax(row))
        second = float(np.partition(row, -2)[-2])
        generated.append(tok)
        margins.append(round(float(row[tok]) - second, LOGIT_DECIMALS))
        llm.eval([tok])
    rows = llm.scores[:llm.n_tokens]
    positions = []
    for i in range(rows.shape[0]):
        row = np.asarray(rows[i], dtype=np.float32)
        positions.append({"top": top_k_row(row, TOP_K),
                          "logsumexp": round(logsumexp(row), LOGIT_DECIMALS)})
    return {
        "name": name,
        "text": text,
        "parse_special": parse_special,
        "prompt_ids": prompt_ids,
        "generated_ids": generated,
        "generated_text": llm.detokenize(generated).decode("utf-8",
                                                           "replace"),
        "greedy_margins": margins,
        "positions": positions,
    }


def make_golden(model_path, overrides=None):
    """Greedy runs of every prompt; returns (settings, prompts)."""
    reader = GGUFReader(model_path)
    template = gguf_string(reader, "tokenizer.chat_template")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    bos = tokens[int(gguf_string(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(gguf_string(reader, "tokenizer.ggml.eos_token_id"))]
    del reader

    settings = dict(LLAMA_SETTINGS)
    settings.update(overrides or {})
    llm = llama_cpp.Llama(model_path, verbose=False, **settings)
    ctx_params = llm.context_params
    settings.update({
        "n_batch": llm.n_batch,
        "n_ubatch": int(ctx_params.n_ubatch),
        "type_k": int(ctx_params.type_k),
        "type_v": int(ctx_params.type_v),
        "flash_attn_type": int(ctx_params.flash_attn_type),
        "add_bos": False,
        "sampling": "argmax of raw logits (no temperature, penalties, "
                    "top-k/top-p)",
        "row_meaning": "positions[i] = logits after feeding token i of "
                       "prompt_ids + generated_ids",
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    })

    prompts = [run_prompt(llm, name, text, False) for name, text in PROMPTS]
    chat_text = render_chat(template, CHAT_QUESTION, bos, eos)
    chat = run_prompt(llm, "chat_capital", chat_text, True)
    chat["chat_text"] = chat_text
    chat["question"] = CHAT_QUESTION
    prompts.append(chat)
    del llm
    return settings, prompts


def dequantize_to_f32(src, dst):
    """Write dst: src with every tensor dequantized to F32 (exact: each
    quantized weight is scale * q + min, representable in fp32)."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, gguf_string(reader, "general.architecture"))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = 0 if key == "general.file_type" else field.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        x = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, x.reshape([int(n) for n in
                                             reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def full_logits(model_path, ids, one_by_one=False, **overrides):
    settings = dict(LLAMA_SETTINGS)
    settings.update(overrides)
    llm = llama_cpp.Llama(model_path, verbose=False, **settings)
    if one_by_one:
        for t in ids:
            llm.eval([t])
    else:
        llm.eval(ids)
    rows = np.array(llm.scores[:llm.n_tokens], dtype=np.float64)
    del llm
    return rows


def lse_rows(r):
    m = r.max(1)
    return m + np.log(np.exp(r - m[:, None]).sum(1))


def report_variance(label, model_path, prompts, base, variants):
    """Print how far llama.cpp's logits move between settings that are
    mathematically equivalent: the noise floor for our tolerances."""
    refs = []
    for p in prompts:
        ids = p["prompt_ids"] + p["generated_ids"]
        refs.append((ids, full_logits(model_path, ids, **base)))
    for vlabel, kw in variants:
        path = kw.pop("model_path", model_path)
        worst_abs = worst_lse = 0.0
        flips = rows = 0
        for ids, ref in refs:
            got = full_logits(path, ids, **dict(base, **kw))
            worst_abs = max(worst_abs, float(np.max(np.abs(got - ref))))
            worst_lse = max(worst_lse, float(np.max(np.abs(
                lse_rows(got) - lse_rows(ref)))))
            flips += int(np.sum(got.argmax(1) != ref.argmax(1)))
            rows += ref.shape[0]
        print(f"[{label}] {vlabel}: max |dlogit| {worst_abs:.4f}, "
              f"max |dlogsumexp| {worst_lse:.4f}, argmax flips "
              f"{flips}/{rows}")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out-dir", default=HERE,
                    help="where to write the JSON files (default: here)")
    ap.add_argument("--keep-f32", metavar="PATH",
                    help="keep the dequantized F32 GGUF at PATH")
    ap.add_argument("--variance", action="store_true",
                    help="also print how much llama.cpp's own logits move "
                         "between equivalent settings (slow)")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    model_name = os.path.basename(args.model)
    gen = generator_string()
    commit = llama_cpp_commit()
    if commit:
        gen += f" (llama.cpp {commit})"

    cases = make_tokenizer_cases(args.model)
    write_json(os.path.join(args.out_dir, "tokenizer_cases.json"),
               {"model": model_name, "generator": gen, "cases": cases})

    settings, prompts = make_golden(args.model)
    golden = {"model": model_name, "generator": gen, "settings": settings,
              "n_gen": N_GEN, "top_k": TOP_K, "prompts": prompts}

    # Second reference: the same weights dequantized to F32 and an F32 KV
    # cache, so llama.cpp quantizes no activations (see README.md).
    tmpdir = tempfile.mkdtemp(prefix="cp_golden_")
    f32_path = args.keep_f32 or os.path.join(tmpdir, "deq-f32.gguf")
    f32_kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32}
    try:
        dequantize_to_f32(args.model, f32_path)
        f32_settings, f32_prompts = make_golden(f32_path, f32_kv)
        f32_settings["weights"] = ("every tensor of the model dequantized "
                                   "to F32 (tokenizer/metadata unchanged)")
        golden["reference_f32"] = {"settings": f32_settings,
                                   "prompts": f32_prompts}
        write_json(os.path.join(args.out_dir, "smollm2_golden.json"), golden)
        print(f"wrote {len(cases)} tokenizer cases and {len(prompts)} "
              f"prompts (x2 references) to {args.out_dir}")
        if args.variance:
            report_variance("quantized model", args.model, prompts, {}, [
                ("token-by-token eval", {"one_by_one": True}),
                ("n_threads=1", {"n_threads": 1}),
                ("F32 KV cache", dict(f32_kv)),
                ("flash attention on", {"flash_attn": True}),
                ("weights dequantized to F32", {"model_path": f32_path}),
            ])
            report_variance("F32 reference", f32_path, f32_prompts, f32_kv, [
                ("token-by-token eval", {"one_by_one": True}),
                ("n_threads=1", {"n_threads": 1}),
                ("F16 KV cache", {"type_k": 1, "type_v": 1}),
                ("flash attention on", {"flash_attn": True}),
            ])
    finally:
        if not args.keep_f32 and os.path.exists(f32_path):
            os.remove(f32_path)
        os.rmdir(tmpdir)

if __name__ == "__main__":
    main()
