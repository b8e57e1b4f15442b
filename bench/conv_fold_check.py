"""Batch-norm folding against eager on the GPU, float32 with cuDNN's TF32 on (the default: float32 convolutions are
then not folded, their batch norms become epilogues) and off (folded exactly, or an epilogue where the weight is
already channels-last), and bfloat16: each tiny CNN's max error through ember.compile, its tolerance, and how many
batch norms were folded, made epilogues and kept.
Usage: python bench/conv_fold_check.py [--out DIR]
"""
from __future__ import annotations

import argparse

import torch

import ember
from ember import models
from ember.tolerance import result_tolerance

from common import environment, write_results

MODELS = ("mobilenet_v2", "resnet50", "convnext_t", "cnn", "unet")


def check(name: str, dtype: torch.dtype, tf32: bool) -> dict:
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model, inputs = models.load(name)
    model = model.to(device="cuda", dtype=dtype)
    inputs = tuple(t.to(device="cuda", dtype=dtype) if t.is_floating_point() else t.cuda() for t in inputs)
    with torch.no_grad():
        expected = model(*inputs)
        program = ember.compile(model, inputs)
        error = models.max_error(expected, program(*inputs))
    decisions = program.report.pass_decisions.get("fold_batch_norm", [])
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "tf32": tf32, "max_err": error,
            "tolerance": result_tolerance(expected), "folded": sum(" folded into convolution " in d for d in decisions),
            "epilogue": sum(" scale and shift " in d for d in decisions),
            "kept": sum(" kept: " in d for d in decisions), "passed": error <= result_tolerance(expected)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows = [check(name, dtype, tf32) for name in MODELS
            for dtype, tf32 in ((torch.float32, True), (torch.float32, False), (torch.bfloat16, True))]
    torch.backends.cudnn.allow_tf32 = True
    lines = [f"{'model':13} {'dtype':9} {'tf32':>5} {'max err':>9} {'tol':>9} {'folded':>6} {'epilogue':>8} {'kept':>5}  ok"]
    lines += [f"{r['model']:13} {r['dtype']:9} {str(r['tf32']):>5} {r['max_err']:9.2e} {r['tolerance']:9.2e} "
              f"{r['folded']:>6} {r['epilogue']:>8} {r['kept']:>5}  {'yes' if r['passed'] else 'NO'}" for r in rows]
    write_results(args.out, "conv_fold_check", {**environment(torch.device("cuda")), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
