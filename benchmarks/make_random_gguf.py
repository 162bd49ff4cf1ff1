#!/usr/bin/env python3
"""Write a random-weight llama-architecture GGUF for benchmarking.

Weights are N(0, 0.02) (norm weights 1 + N(0, 0.02)), seeded, with the
tokenizer metadata copied from a real model so every engine can tokenize.
Optionally quantizes the result with llama.cpp's own quantizer
(llama-cpp-python). Timing only: the outputs of these models mean nothing.
"""

import argparse
import ctypes
import os
import sys

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("make_random_gguf.py: needs the 'gguf' package "
             "(e.g. run it with /opt/llamacpp/bin/python)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOKENIZER = os.path.join(REPO, "models",
                                 "SmolLM2-135M-Instruct.Q4_1.gguf")
WEIGHT_STD = 0.02

# llama.cpp's llama_ftype values for the types we quantize to.
QUANT_FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}


def copy_tokenizer(writer, src_path):
    """Copy every tokenizer.* key of src_path; return the vocabulary size."""
    reader = gguf.GGUFReader(src_path)
    n_vocab = None
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab is None:
        sys.exit(f"make_random_gguf.py: {src_path} has no tokenizer.ggml.tokens")
    return n_vocab


def tensor_plan(a, n_vocab):
    """(name, numpy shape (rows=out, cols=in), is_norm) in file order."""
    head_dim = a.dim // a.heads
    kv_dim = head_dim * a.kv_heads
    plan = [("token_embd.weight", (n_vocab, a.dim), False)]
    for i in range(a.layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (a.dim,), True),
            (p + "attn_q.weight", (a.dim, a.dim), False),
            (p + "attn_k.weight", (kv_dim, a.dim), False),
            (p + "attn_v.weight", (kv_dim, a.dim), False),
            (p + "attn_output.weight", (a.dim, a.dim), False),
            (p + "ffn_norm.weight", (a.dim,), True),
            (p + "ffn_gate.weight", (a.ffn, a.dim), False),
            (p + "ffn_up.weight", (a.ffn, a.dim), False),
            (p + "ffn_down.weight", (a.dim, a.ffn), False),
        ]
    plan.append(("output_norm.weight", (a.dim,), True))
    if not a.tie_embeddings:
        plan.append(("output.weight", (n_vocab, a.dim), False))
    return plan


def write_model(a):
    if a.dim % a.heads or a.heads % a.kv_heads:
        sys.exit("make_random_gguf.py: dim must be a multiple of heads and "
                 "heads a multiple of kv-heads")
    wtype = np.float16 if a.type == "f16" else np.float32
    writer = gguf.GGUFWriter(a.out, "llama")
    writer.add_name(f"random-llama-{a.dim}x{a.layers}")
    writer.add_context_length(a.ctx)
    writer.add_embedding_length(a.dim)
    writer.add_block_count(a.layers)
    writer.add_feed_forward_length(a.ffn)
    writer.add_head_count(a.heads)
    writer.add_head_count_kv(a.kv_heads)
    writer.add_rope_dimension_count(a.dim // a.heads)
    writer.add_rope_freq_base(a.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if a.type == "f16"
                         else gguf.LlamaFileType.ALL_F32)
    n_vocab = copy_tokenizer(writer, a.tokenizer_from)
    writer.add_vocab_size(n_vocab)

    plan = tensor_plan(a, n_vocab)
    for name, shape, is_norm in plan:
        dt = np.float32 if is_norm else wtype
        nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
        writer.add_tensor_info(name, shape, np.dtype(dt), nbytes)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(a.seed)
    n_params = 0
    # Tensors are generated one at a time so peak memory stays ~1 tensor.
    for name, shape, is_norm in plan:
        x = rng.standard_normal(size=shape, dtype=np.float32) * WEIGHT_STD
        if is_norm:
            x += 1.0
        else:
            x = x.astype(wtype)
        n_params += x.size
        writer.write_tensor_data(x)
    writer.close()
    print(f"wrote {a.out}: {n_params / 1e6:.1f}M params, type {a.type}, "
          f"vocab {n_vocab}")


def quantized_path(out, qtype):
    base = out[:-5] if out.endswith(".gguf") else out
    for suffix in (".f16", ".f32", ".F16", ".F32"):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
    return f"{base}.{qtype}.gguf"


def quantize(src, qtype, nthread):
    try:
        import llama_cpp
    except ImportError:
        sys.exit("make_random_gguf.py: --quantize needs llama-cpp-python")
    dst = quantized_path(src, qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[qtype]
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(),
                                        ctypes.byref(params))
    if rc != 0:
        sys.exit(f"make_random_gguf.py: llama_model_quantize({qtype}) "
                 f"failed with {rc}")
    print(f"wrote {dst} ({os.path.getsize(dst) / 2**20:.1f} MiB)")
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output .gguf path")
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--type", choices=("f16", "f32"), default="f16")
    ap.add_argument("--ctx", type=int, default=4096,
                    help="llama.context_length (default 4096)")
    ap.add_argument("--rope-base", type=float, default=100000.0)
    ap.add_argument("--tie-embeddings", action="store_true",
                    help="no output.weight: the LM head reuses token_embd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", default=DEFAULT_TOKENIZER,
                    help="GGUF whose tokenizer.* metadata is copied")
    ap.add_argument("--quantize", default="",
                    help="comma list of " + ",".join(QUANT_FTYPES) +
                    ": also write llama.cpp-quantized copies next to --out")
    ap.add_argument("--drop-source", action="store_true",
                    help="delete --out after quantizing")
    ap.add_argument("--threads", type=int, default=2,
                    help="quantizer threads (default 2)")
    a = ap.parse_args()

    qtypes = [q.strip().upper() for q in a.quantize.split(",") if q.strip()]
    for q in qtypes:
        if q not in QUANT_FTYPES:
            sys.exit(f"make_random_gguf.py: unknown quant type {q}")
    write_model(a)
    for q in qtypes:
        quantize(a.out, q, a.threads)
    if qtypes and a.drop_source:
        os.remove(a.out)


if __name__ == "__main__":
    main()
