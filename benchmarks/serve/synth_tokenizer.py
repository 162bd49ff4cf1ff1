#!/usr/bin/env python3
"""synth_tokenizer.py - writes a byte-level BPE tokenizer.json into a model
directory that has none (`cparallel synth` writes weights and config.json
only, and `cparallel serve` needs a tokenizer), sized to config.json's
vocab_size so that every token id the model can emit decodes to text.

Ids 0-255 are the 256 byte-level symbols; then come loadgen.py's words with a
leading space (" word", built by merges that all start from the space, so a
prompt of L words from loadgen.py is exactly L tokens); every id left is a
filler (" t<id>", never produced by encoding but decoded as non-empty text);
config.json's bos/eos ids become control tokens. Timing only: the text is
meaningless, as are the random weights it goes with. Standard library only.

  synth_tokenizer.py --model-dir DIR [--force]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loadgen import WORDS  # noqa: E402


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (as in tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build(vocab_size, bos, eos):
    b2u = bytes_to_unicode()
    special = {i: name for i, name in ((bos, "<|begin_of_text|>"), (eos, "<|end_of_text|>"))
               if isinstance(i, int) and 0 <= i < vocab_size}
    vocab, merges = {}, []
    next_id = 0

    def take_id():
        nonlocal next_id
        while next_id in special:
            next_id += 1
        i = next_id
        next_id += 1
        return i

    for b in range(256):
        vocab[b2u[b]] = take_id()
    space = b2u[ord(" ")]
    # chains " w" -> " wo" -> " wor" -> " word": every merge's left side starts
    # with the space symbol, so no merge inside a word competes with them
    for w in WORDS:
        cur = space
        for ch in w:
            nxt = cur + b2u[ord(ch)]
            if nxt not in vocab:
                if next_id >= vocab_size - len(special):
                    break
                vocab[nxt] = take_id()
                merges.append([cur, b2u[ord(ch)]])
            cur = nxt
    while True:
        i = take_id()
        if i >= vocab_size:
            break
        vocab[space + "t%d" % i] = i
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, name in sorted(special.items())]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="directory with config.json")
    ap.add_argument("--force", action="store_true", help="replace an existing tokenizer.json")
    a = ap.parse_args(argv)
    out = os.path.join(a.model_dir, "tokenizer.json")
    if os.path.exists(out) and not a.force:
        print("synth_tokenizer: %s exists; kept (--force replaces it)" % out)
        return 0
    with open(os.path.join(a.model_dir, "config.json")) as f:
        cfg = json.load(f)
    n = int(cfg["vocab_size"])
    if n < 258:
        sys.stderr.write("synth_tokenizer: vocab_size %d is below the 256 byte symbols\n" % n)
        return 1
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    tok = build(n, cfg.get("bos_token_id"), eos)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    os.replace(tmp, out)
    words = sum(1 for w in WORDS if ("\u0120" + w) in tok["model"]["vocab"])
    print("synth_tokenizer: wrote %s (%d ids, %d of %d words as single tokens)" % (
        out, n, words, len(WORDS)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
