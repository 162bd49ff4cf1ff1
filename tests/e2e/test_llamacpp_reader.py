#!/usr/bin/env python3
"""test_llamacpp_reader.py - what `cparallel quantize` writes, read by
llama.cpp's own GGUF reader (its gguf-py package: GGUFReader and
gguf.quants.dequantize), as the README promises. For q8_0, q4_0 and q4_k of
the default model:

- the file opens; it holds every tensor of the source under its name and
  shape, at offsets aligned as general.alignment says, in the type llama.cpp
  expects (the target, or Q4_0 for q4_k where a row is not whole 256-element
  super-blocks), the norms F32; the metadata are the source's, value for
  value (architecture, hyperparameters, the whole tokenizer, chat template),
  but for general.file_type, which names the new type as llama.cpp's own
  files do (MOSTLY_Q8_0, MOSTLY_Q4_0, MOSTLY_Q4_K_S);
- llama.cpp's dequantization of the matrices equals cparallel's own (the
  same file rewritten by `cparallel quantize --type f32`) to 1e-6 of the
  tensor's largest value (float32 rounding; seen: equal);
- and lies within the type's rounding of the source's values (llama.cpp's
  dequantization of the Q4_1/Q8_0 original): relative RMS error per tensor
  below a bound per type, about twice what was measured; a wrong block
  layout, scale or nibble order gives about 1.

Usage: test_llamacpp_reader.py [--cparallel PATH] [--model PATH]
(defaults from CP_CPARALLEL and CP_TEST_MODEL). Without gguf and numpy it
runs itself again with CP_TEST_PYTHON (the .venv-test of
scripts/install_deps.sh) when that has them. Exit code 77 = skipped (no
such Python, no model, no binary)."""
import argparse
import os
import subprocess
import sys
import tempfile
import unittest

SKIP = 77
ARGS = None

# Relative RMS error of llama.cpp's dequantization of a written tensor
# against the source's values, by the written type. Measured on the
# default model (Q4_1 block matrices, Q8_0 embedding), worst tensor:
# Q8_0 0.0065, Q4_0 0.111, Q4_K 0.020 (its 32-element sub-blocks with a
# scale and a minimum nearly hold Q4_1's grid).
MAX_REL_RMS = {"Q8_0": 0.015, "Q4_0": 0.25, "Q4_K": 0.05}
# Tensors whose values are compared: the embedding (the tied LM head) and
# every matrix of the first, a middle and the last layer.
LAYERS = (0, 15, 29)
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def quantize(src, dst, qtype):
    """`cparallel quantize` without the accuracy gate (not what is tested here)."""
    r = subprocess.run([ARGS.cparallel, "quantize", "--no-progress", "--no-eval", "--model", src, "--out", dst,
                        "--type", qtype], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"cparallel quantize --type {qtype} failed ({r.returncode}): {r.stderr}")


def compared_names():
    names = ["token_embd.weight"]
    for layer in LAYERS:
        names += [f"blk.{layer}.{m}.weight" for m in MATRICES]
    return names


class LlamaCppReadsQuantized(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import gguf
        cls.gguf = gguf
        cls.tmp = tempfile.TemporaryDirectory(prefix="cp-llamacpp-")
        cls.src = gguf.GGUFReader(ARGS.model)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def expected_type(self, qtype, src_tensor):
        Q = self.gguf.GGMLQuantizationType
        if len(src_tensor.shape) < 2:
            return Q.F32
        if qtype == "q4_k":
            return Q.Q4_K if src_tensor.shape[0] % 256 == 0 else Q.Q4_0
        return {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]

    def check_type(self, qtype):
        import numpy as np
        from gguf.quants import dequantize
        path = os.path.join(self.tmp.name, f"{qtype}.gguf")
        quantize(ARGS.model, path, qtype)
        out = self.gguf.GGUFReader(path)

        # metadata: the source's, value for value
        self.assertEqual(out.fields["general.architecture"].contents(), "llama")
        for key, field in self.src.fields.items():
            if key.startswith("GGUF.") or key == "general.file_type":
                continue
            with self.subTest(qtype=qtype, key=key):
                self.assertIn(key, out.fields)
                self.assertEqual(out.fields[key].contents(), field.contents())
        self.assertEqual(len(out.fields["tokenizer.ggml.tokens"].contents()),
                         out.fields["llama.vocab_size"].contents())
        self.assertGreater(len(out.fields["tokenizer.ggml.merges"].contents()), 0)

        # tensors: the same names and shapes, aligned, in the expected types
        src_t = {t.name: t for t in self.src.tensors}
        out_t = {t.name: t for t in out.tensors}
        self.assertEqual(len(out.tensors), len(self.src.tensors))
        self.assertEqual(sorted(out_t), sorted(src_t))
        file_size = os.path.getsize(path)
        for name, t in out_t.items():
            with self.subTest(qtype=qtype, tensor=name):
                self.assertEqual(list(t.shape), list(src_t[name].shape))
                self.assertEqual(t.tensor_type, self.expected_type(qtype, src_t[name]))
                self.assertEqual(t.data_offset % out.alignment, 0)
                self.assertLessEqual(t.data_offset + t.n_bytes, file_size)
        types = {t.tensor_type for t in out.tensors}
        if qtype == "q4_k":  # ffn_down rows are 1536 = 6 super-blocks
            self.assertIn(self.gguf.GGMLQuantizationType.Q4_K, types)

        # values: llama.cpp's dequantization against cparallel's and the source's
        f32 = os.path.join(self.tmp.name, f"{qtype}.f32.gguf")
        quantize(path, f32, "f32")
        ours = {t.name: t for t in self.gguf.GGUFReader(f32).tensors}
        worst_ours, worst_src = 0.0, {}
        for name in compared_names():
            t = out_t[name]
            theirs = dequantize(t.data, t.tensor_type).reshape(-1)
            mine = np.asarray(ours[name].data, dtype=np.float32).reshape(-1)
            ref = dequantize(src_t[name].data, src_t[name].tensor_type).reshape(-1)
            with self.subTest(qtype=qtype, tensor=name):
                self.assertEqual(ours[name].tensor_type, self.gguf.GGMLQuantizationType.F32)
                self.assertEqual(theirs.size, mine.size)
                scale = float(np.abs(mine).max())
                diff = float(np.abs(theirs - mine).max())
                self.assertLessEqual(diff, 1e-6 * scale, f"llama.cpp and cparallel dequantize {name} differently")
                rel = float(np.sqrt(np.mean((theirs - ref) ** 2) / np.mean(ref.astype(np.float64) ** 2)))
                self.assertLess(rel, MAX_REL_RMS[t.tensor_type.name], f"{name} is not the source's values")
                worst_ours = max(worst_ours, diff / scale)
                worst_src[t.tensor_type.name] = max(worst_src.get(t.tensor_type.name, 0.0), rel)
        print(f"{qtype}: {len(out.tensors)} tensors {sorted(x.name for x in types)}; dequantized against "
              f"cparallel's: largest difference {worst_ours:.3g} of the tensor's range; against the source: "
              "relative RMS error up to " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst_src.items())),
              file=sys.stderr)
        os.unlink(f32)
        os.unlink(path)

    def test_q8_0(self):
        self.check_type("q8_0")

    # general.file_type names the new type (the source, the Q4_1 model,
    # says MOSTLY_Q4_1), as llama.cpp prints it for the file
    def test_file_type_names_the_new_type(self):
        want = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_k": "MOSTLY_Q4_K_S"}
        for t, name in want.items():
            path = os.path.join(self.tmp.name, f"ft_{t}.gguf")
            quantize(ARGS.model, path, t)
            out = self.gguf.GGUFReader(path)
            self.assertEqual(out.fields["general.file_type"].contents(),
                             self.gguf.LlamaFileType[name].value, t)
            os.unlink(path)

    def test_q4_0(self):
        self.check_type("q4_0")

    def test_q4_k(self):
        self.check_type("q4_k")


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--cparallel", default=os.environ.get("CP_CPARALLEL", ""))
    ap.add_argument("--model", default=os.environ.get("CP_TEST_MODEL", ""))
    ARGS, rest = ap.parse_known_args()
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
        from gguf.quants import dequantize  # noqa: F401
    except ImportError:
        other = os.environ.get("CP_TEST_PYTHON", "")
        # (a venv's python links to the base interpreter: a mark, not paths, stops a second try)
        if other and os.access(other, os.X_OK) and not os.environ.get("CP_LLAMACPP_READER_AGAIN"):
            os.environ["CP_LLAMACPP_READER_AGAIN"] = "1"
            os.execv(other, [other, os.path.abspath(__file__), *sys.argv[1:]])
        print(f"SKIPPED: {sys.executable} lacks gguf/numpy (scripts/install_deps.sh makes .venv-test)")
        return SKIP
    if not ARGS.model or not os.path.isfile(ARGS.model):
        print(f"SKIPPED: no test model at '{ARGS.model}' (set CP_TEST_MODEL)")
        return SKIP
    if not ARGS.cparallel or not os.access(ARGS.cparallel, os.X_OK):
        print(f"SKIPPED: no cparallel binary at '{ARGS.cparallel}' (set CP_CPARALLEL)")
        return SKIP
    prog = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False)
    return 0 if prog.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
