#!/usr/bin/env python3
"""SentencePiece BPE reference fixture for the tokenizer tests.

Trains a tiny BPE model with the `sentencepiece` package (Llama 2's settings:
byte fallback, identity normalisation, extra whitespace kept, a dummy space
prefix, digits split) on the license texts every Debian system ships, writes
its vocabulary as a tensor-less GGUF (tokenizer.ggml.model = "llama", tokens,
scores, token types) and the ids sentencepiece produces for the test strings:

    tests/golden/spm_tiny.gguf
    tests/golden/spm_cases.json   {"cases": [{"text", "ids", "decoded", "hf_ids"}]}
    tests/golden/spm_tiny_tokenizer.json  the same model as a Hugging Face
        tokenizer.json (Llama 2 layout); hf_ids are what `tokenizers` gives

    pip install sentencepiece gguf tokenizers
    python3 tests/golden/make_spm_fixture.py
"""
import glob
import json
import os
import tempfile

import gguf
import sentencepiece as spm
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 800

TEXTS = [
    "",
    " ",
    "  leading",
    "Hello world",
    "Hello, world! 123 4567",
    "\u00ef\u00fc\u00e9 \u65e5\u672c\u8a9e \U0001f999",
    "tabs\tand\nnewlines\n\n",
    "<s>user\nHi</s>",
    "don't I'll we've",
    "3.14159",
    "int main() { return 0; }",
    "a" * 1000,
    "   ",
    "trailing spaces   ",
    "a  b   c    d",
    "the GNU General Public License",
    "Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>",
    "permission is hereby granted, free of charge",
    "\U0001f600\U0001f44d \u2764\ufe0f",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "caf\u00e9 na\u00efve \u00bd",
    "WARRANTY; without even the implied warranty of MERCHANTABILITY",
    "x=1;y=22;z=333",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c",
    "\x01\x7f control",
    "\u2581 already escaped \u2581\u2581",
    "end with newline\n",
    "Licensor  Licensee   Work",
    "zzzzqqqq jjjj",
    "<unk> <0x41> literal",
]


def corpus_text():
    parts = []
    for p in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(p):
            with open(p, encoding="utf-8", errors="ignore") as f:
                parts.append(f.read())
    text = "\n".join(parts)
    if len(text) < 50000:
        raise SystemExit("not enough training text under /usr/share/common-licenses")
    return text


def hf_tokenizer_json(tokens, scores, types):
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: x[2], reverse=True)  # stable: ties keep vocab order
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (2, 3)]
    return {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": vocab, "merges": ["%s %s" % (a, b) for a, b, _ in merges]},
    }


def main():
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(corpus_text())
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=prefix, vocab_size=VOCAB_SIZE, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1, minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")

    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)

    w = gguf.GGUFWriter(os.path.join(HERE, "spm_tiny.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # The same model as a Hugging Face tokenizer.json (Llama 2 layout: BPE
    # with byte fallback, Prepend + Replace normalizer), merges derived from
    # the scores the way Hugging Face's converter does.
    hf_json = hf_tokenizer_json(tokens, scores, types)
    with open(os.path.join(HERE, "spm_tiny_tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(hf_json, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    hf = Tokenizer.from_str(json.dumps(hf_json))

    cases = []
    for t in TEXTS:
        ids = sp.encode(t)
        hf_ids = hf.encode(t, add_special_tokens=False).ids
        cases.append({"text": t, "ids": ids, "decoded": sp.decode(ids), "hf_ids": hf_ids})
    with open(os.path.join(HERE, "spm_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"generator": "tests/golden/make_spm_fixture.py", "sentencepiece": spm.__version__,
                   "vocab_size": n, "cases": cases}, f, ensure_ascii=True)
        f.write("\n")
    print("vocab %d, %d cases" % (n, len(cases)))


if __name__ == "__main__":
    main()
