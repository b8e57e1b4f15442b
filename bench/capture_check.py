"""Which step keeps a model's calls out of a CUDA graph: decode with a static cache through the ember backend.

Runs transformers' Llama (tiny config) `generate` with a static cache and the forward compiled by
torch.compile(backend="ember") on the GPU, with ember's log on, so a call that cannot be captured names the
generated wrapper line where capture failed. Usage: python bench/capture_check.py
"""
from __future__ import annotations

import logging

import torch

from decode import generate, llama

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
model = llama("tiny", torch.float32, "cuda")
model.forward = torch.compile(model.forward, backend="ember", fullgraph=True)
with torch.no_grad():
    prompt = torch.randint(1, model.config.vocab_size, (1, 16), device="cuda")
    generate(model, prompt, 4, 64)
