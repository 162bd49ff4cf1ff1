#!/usr/bin/env python3
"""make_corpus.py - writes the small seed corpus of the GGUF and safetensors
fuzz targets (tests/fuzz/corpus/{gguf,safetensors}/). GGUF seeds come from the
`gguf` Python package's writer; safetensors seeds are laid out byte by byte
here. Deterministic: running it again rewrites identical files.

usage: python3 tests/fuzz/make_corpus.py [OUT_DIR]   (default: corpus/ beside this file)
"""
import json
import os
import struct
import sys

import numpy as np
import gguf

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_llama_gguf(path, arch="llama", qkv_bias=False):
    """A 1-layer Llama-style model: hyper-parameters, a 6-token vocabulary and
    every weight of the layer in F32 or F16."""
    rng = np.random.default_rng(7)
    dim, ffn, n_vocab = 8, 16, 6
    w = gguf.GGUFWriter(path, arch)
    w.add_name("fuzz-seed")
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b", "ab", "\u0120c"])
    w.add_token_scores([0.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    w.add_token_types([3, 3, 1, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w.add_tensor("token_embd.weight", f32(n_vocab, dim))
    w.add_tensor("output_norm.weight", f32(dim))
    w.add_tensor("blk.0.attn_norm.weight", f32(dim))
    w.add_tensor("blk.0.ffn_norm.weight", f32(dim))
    hd = dim // 2
    for name, rows in (("attn_q", dim), ("attn_k", hd), ("attn_v", hd), ("attn_output", dim)):
        w.add_tensor(f"blk.0.{name}.weight", f32(rows, dim).astype(np.float16))
    if qkv_bias:
        for name, rows in (("attn_q", dim), ("attn_k", hd), ("attn_v", hd)):
            w.add_tensor(f"blk.0.{name}.bias", f32(rows))
    for name, shape in (("ffn_gate", (ffn, dim)), ("ffn_up", (ffn, dim)),
                        ("ffn_down", (dim, ffn))):
        w.add_tensor(f"blk.0.{name}.weight", f32(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quant_gguf(path):
    """Block-quantized tensors as raw bytes (Q4_0, Q4_1, Q8_0: 32 weights per
    block; Q4_K, Q6_K: 256), a short row each, with small fp16 scales."""
    rng = np.random.default_rng(5)
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    for name, qt, n_el, bs in (("q4_0", Q.Q4_0, 64, 18), ("q4_1", Q.Q4_1, 32, 20),
                               ("q8_0", Q.Q8_0, 64, 34), ("q4_k", Q.Q4_K, 256, 144),
                               ("q6_k", Q.Q6_K, 256, 210)):
        n_bytes = n_el // gguf.GGML_QUANT_SIZES[qt][0] * bs
        raw = rng.integers(0, 256, size=(2, n_bytes), dtype=np.uint8)
        w.add_tensor(f"blk.0.{name}.weight", raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def all_types_gguf(path):
    """Metadata of every value type (scalars and arrays), no tensors."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "h\u00e9llo")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", -2.25)
    w.add_array("t.arr.i32", [1, -2, 3])
    w.add_array("t.arr.f32", [0.5, 1.5])
    w.add_array("t.arr.str", ["x", "", "yz"])
    w.add_array("t.arr.bool", [True, False])
    w.add_array("t.arr.empty", [])
    w.add_key_value("t.arr.u8", [1, 2, 255], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.UINT8)
    w.add_key_value("t.arr.nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def safetensors_image(tensors, metadata=None, pad_to=8):
    """tensors: list of (name, dtype string, shape, raw bytes), packed in order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad_to:
        h += b" " * ((-(8 + len(h))) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


def st_seeds():
    rng = np.random.default_rng(11)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    seeds = {}
    dim, ffn, vocab = 8, 16, 6
    t = [("model.embed_tokens.weight", "F32", (vocab, dim), f(vocab, dim).tobytes()),
         ("model.norm.weight", "F32", (dim,), f(dim).tobytes()),
         ("lm_head.weight", "F16", (vocab, dim), f(vocab, dim).astype(np.float16).tobytes())]
    for p, rows in (("q", dim), ("k", 4), ("v", 4), ("o", dim)):
        t.append((f"model.layers.0.self_attn.{p}_proj.weight", "BF16", (rows, dim),
                  (f(rows, dim).view(np.uint32) >> 16).astype(np.uint16).tobytes()))
    for p, shape in (("gate", (ffn, dim)), ("up", (ffn, dim)), ("down", (dim, ffn))):
        t.append((f"model.layers.0.mlp.{p}_proj.weight", "F32", shape, f(*shape).tobytes()))
    t.append(("model.layers.0.input_layernorm.weight", "F32", (dim,), f(dim).tobytes()))
    t.append(("model.layers.0.post_attention_layernorm.weight", "F32", (dim,), f(dim).tobytes()))
    seeds["llama_tiny.safetensors"] = safetensors_image(t, {"format": "pt"})
    qwen = [("model.layers.1.self_attn.q_proj.bias", "F32", (dim,), f(dim).tobytes()),
            ("model.layers.1.self_attn.k_proj.bias", "F32", (4,), f(4).tobytes()),
            ("model.layers.1.self_attn.v_proj.bias", "F64", (4,),
             f(4).astype(np.float64).tobytes())]
    seeds["qwen_bias_unpadded.safetensors"] = safetensors_image(qwen, None, pad_to=0)
    every = []
    for dt, npt in (("F64", np.float64), ("F32", np.float32), ("F16", np.float16),
                    ("I64", np.int64), ("I32", np.int32), ("I16", np.int16), ("I8", np.int8),
                    ("U64", np.uint64), ("U32", np.uint32), ("U16", np.uint16), ("U8", np.uint8)):
        every.append((f"x.{dt.lower()}", dt, (2, 1, 3), np.arange(6).astype(npt).tobytes()))
    every += [("x.bf16", "BF16", (3,), b"\x80\x3f" * 3), ("x.bool", "BOOL", (2,), b"\x01\x00"),
              ("x.f8e4m3", "F8_E4M3", (2, 2), b"\x38\x40\xb8\x00"),
              ("x.f8e5m2", "F8_E5M2", (1,), b"\x3c"),
              ("x.scalar", "F32", (), np.float32(2.5).tobytes()),
              ("x.empty", "F32", (0, 5), b""),
              ("x.four", "I8", (1, 2, 1, 2), b"\x01\x02\x03\x04")]
    seeds["every_dtype.safetensors"] = safetensors_image(every, {"k": "v", "empty": ""})
    seeds["empty_header.safetensors"] = safetensors_image([], None)
    return seeds


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")
    gdir, sdir = os.path.join(out, "gguf"), os.path.join(out, "safetensors")
    os.makedirs(gdir, exist_ok=True)
    os.makedirs(sdir, exist_ok=True)
    tiny_llama_gguf(os.path.join(gdir, "llama_tiny.gguf"))
    tiny_llama_gguf(os.path.join(gdir, "qwen2_bias.gguf"), arch="qwen2", qkv_bias=True)
    quant_gguf(os.path.join(gdir, "quant.gguf"))
    all_types_gguf(os.path.join(gdir, "all_types.gguf"))
    for name, data in st_seeds().items():
        with open(os.path.join(sdir, name), "wb") as fh:
            fh.write(data)
    for d in (gdir, sdir):
        for n in sorted(os.listdir(d)):
            print(f"{os.path.join(d, n)}: {os.path.getsize(os.path.join(d, n))} bytes")


if __name__ == "__main__":
    main()
