#!/usr/bin/env python3
"""benchmarks/parallel/perf_model.py: its arithmetic and its inputs.

The measured kernel inputs come from one H100 decoding Llama-3-8B shapes
(benchmarks/gpu/results/h100_2026-11-24): fed those shapes at TP=1, the
model must give back the step times measured there (6.17 ms with graphs),
or its fit is wrong. The 70B split must give the per-rank shapes of this
runtime's launches, and the built runtime must cost exactly its listed
overheads more than the target one. Standard library only.
"""
import argparse
import contextlib
import io
import os
import sys
import unittest

sys.dont_write_bytecode = True  # nothing written into the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks", "parallel"))
import perf_model as pm  # noqa: E402

LLAMA3_8B = ["--tp", "1", "--layers", "32", "--dim", "4096", "--heads", "32", "--kv-heads", "8",
             "--ffn", "14336", "--vocab", "128256", "--ctx", "16"]


def run(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = pm.main(args)
    return rc, out.getvalue()


def args_of(**kw):
    a = argparse.Namespace(tp=8, ctx=1024, weight_bytes=2.0, kv_bytes=2.0, act_bytes=0, gpu_bw=None,
                           ar_latency_us=None, runtime="built", kernels="measured",
                           model=dict(pm.LLAMA2_70B))
    for k, v in kw.items():
        setattr(a, k, v)
    return a


class PerfModel(unittest.TestCase):
    def test_reproduces_the_single_gpu_measurement_it_was_fitted_to(self):
        rc, out = run(LLAMA3_8B + ["--runtime", "target", "--check", "6.17"])
        self.assertEqual(rc, 0, out)
        self.assertIn("inside the bounds", out)
        a = args_of(tp=1, ctx=16, runtime="target",
                    model=dict(layers=32, dim=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256))
        total_ms = pm.breakdown(a, pm.NOM)["total"] / 1e3
        self.assertLess(abs(total_ms - 6.17) / 6.17, 0.03, total_ms)
        # the GEMV fit alone against the measured 5.51 ms of GEMVs
        t = pm.breakdown(a, pm.NOM)
        gemv_ms = (t["weights"] + t["gemv_fixed"] + t["lm_head"]) / 1e3
        self.assertLess(abs(gemv_ms - 5.51) / 5.51, 0.03, gemv_ms)

    def test_rank_shapes_of_llama2_70b_at_tp8(self):
        launches, kv_l, hd = pm.rank_shapes(pm.LLAMA2_70B, 8)
        self.assertEqual(hd, 128)
        self.assertEqual(kv_l, 1)
        self.assertEqual(launches, [(1280, 8192), (8192, 1024), (7168, 8192), (8192, 3584)])
        self.assertAlmostEqual(sum(r * c for r, c in launches) * 2 / 1e6, 213.9, places=1)
        # more ranks than KV heads: each keeps one, replicated
        launches16, kv16, _ = pm.rank_shapes(pm.LLAMA2_70B, 16)
        self.assertEqual(kv16, 1)
        self.assertEqual(launches16[0], ((4 + 2) * 128, 8192))

    def test_built_costs_its_listed_overheads_more_than_target(self):
        built = pm.breakdown(args_of(), pm.NOM)
        target = pm.breakdown(args_of(runtime="target"), pm.NOM)
        n = 2 * 80 + 1
        self.assertEqual(built["_n_coll"], n)
        self.assertAlmostEqual(built["host_wait"], n * pm.HOST_WAIT_US[pm.NOM])
        self.assertEqual(target["host_wait"], 0.0)
        self.assertEqual(built["_act"], 4)
        self.assertEqual(target["_act"], 2)
        extra = (built["host_wait"] + built["allreduce"] - target["allreduce"]
                 + 80 * (pm.OTHER_LAYER_US_NOGRAPH[pm.NOM] - pm.OTHER_LAYER_US_GRAPH[pm.NOM]))
        self.assertAlmostEqual(built["total"] - target["total"], extra, places=6)
        # bounds enclose the nominal value
        lo, hi = pm.breakdown(args_of(), pm.LOW), pm.breakdown(args_of(), pm.HIGH)
        self.assertLess(hi["total"], built["total"])
        self.assertLess(built["total"], lo["total"])

    def test_bad_layouts_are_refused(self):
        with self.assertRaises(SystemExit):
            run(["--tp", "3"])  # 64 heads do not split over 3 ranks
        rc, out = run(["--check", "1.0"])
        self.assertEqual(rc, 1, out)
        self.assertIn("OUTSIDE", out)


if __name__ == "__main__":
    unittest.main()
