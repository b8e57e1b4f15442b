"""Built-in models: the demo decoder and small configs of the model families ember is tested on.

A model spec is a built-in name or `package.module:function` returning `(model, example_inputs)`;
every command and benchmark resolves specs here, so they all use the same definitions.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .errors import CompileError

ModelAndInputs = tuple[nn.Module, tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    """Size of the demo decoder."""

    vocab_size: int = 512
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    max_positions: int = 128


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention and a GELU MLP, each with a residual."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.heads = config.heads
        self.attention_norm = nn.LayerNorm(config.hidden)
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.attention_out = nn.Linear(config.hidden, config.hidden)
        self.mlp_norm = nn.LayerNorm(config.hidden)
        self.mlp_in = nn.Linear(config.hidden, 4 * config.hidden)
        self.mlp_out = nn.Linear(4 * config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(hidden, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attention_out(attended.transpose(1, 2).reshape(batch, length, hidden))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x)), approximate="tanh"))


class Decoder(nn.Module):
    """A small GPT-style decoder: token and position embeddings, blocks, final norm, tied LM head."""

    def __init__(self, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.token_embedding.weight.T


def demo(batch: int = 2, length: int = 64) -> ModelAndInputs:
    """The demo decoder with random weights and random tokens."""
    config = DecoderConfig()
    return Decoder(config).eval(), (torch.randint(0, config.vocab_size, (batch, length)),)


def mlp(rows: int = 37, features: int = 48, hidden: int = 96) -> ModelAndInputs:
    """Linear -> GELU -> Linear, odd sizes."""
    model = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features))
    return model.eval(), (torch.randn(rows, features),)


class SmallCNN(nn.Module):
    """Two conv/batch-norm/ReLU stages, max pooling, global average pooling and a classifier."""

    def __init__(self, channels: int = 3, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(12, 24, 3, stride=2, groups=3), nn.BatchNorm2d(24), nn.ReLU(),
        )
        self.classifier = nn.Linear(24, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(images), 1).flatten(1))


def cnn(batch: int = 3, size: int = 21) -> ModelAndInputs:
    return SmallCNN().eval(), (torch.randn(batch, 3, size, size),)


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise CompileError("this model needs transformers: pip install 'ember[test]'") from error


def _causal_lm(model: nn.Module, vocab_size: int, batch: int, length: int) -> ModelAndInputs:
    model.config.use_cache = False  # a KV cache is a stateful output ember does not compile
    return model.eval(), (torch.randint(0, vocab_size, (batch, length)),)


def gpt2(batch: int = 2, length: int = 13) -> ModelAndInputs:
    """transformers' GPT-2 LM, two layers of width 64."""
    t = _transformers()
    config = t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=211, n_positions=64, bos_token_id=0, eos_token_id=0)
    return _causal_lm(t.GPT2LMHeadModel(config), config.vocab_size, batch, length)


def llama(batch: int = 2, length: int = 13) -> ModelAndInputs:
    """transformers' Llama LM with grouped-query attention (4 heads, 2 KV heads)."""
    t = _transformers()
    config = t.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=96, vocab_size=211, max_position_embeddings=64)
    return _causal_lm(t.LlamaForCausalLM(config), config.vocab_size, batch, length)


def mixtral(batch: int = 2, length: int = 13) -> ModelAndInputs:
    """transformers' Mixtral LM: 4 experts, top-2 routing."""
    t = _transformers()
    config = t.MixtralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, vocab_size=211, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=64)
    return _causal_lm(t.MixtralForCausalLM(config), config.vocab_size, batch, length)


def bert(batch: int = 2, length: int = 13) -> ModelAndInputs:
    """transformers' BERT encoder, two layers of width 64."""
    t = _transformers()
    config = t.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                          vocab_size=211, max_position_embeddings=64)
    return t.BertModel(config).eval(), (torch.randint(0, config.vocab_size, (batch, length)),)


BUILTIN: dict[str, Callable[[], ModelAndInputs]] = {
    "demo": demo, "mlp": mlp, "cnn": cnn, "gpt2": gpt2, "llama": llama, "mixtral": mixtral, "bert": bert,
}


def load(spec: str) -> ModelAndInputs:
    """Resolve a model spec: a built-in name or `package.module:function` returning (model, example_inputs)."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    module_name, colon, function_name = spec.partition(":")
    if not colon:
        raise CompileError(f"unknown model {spec!r}: use one of {', '.join(BUILTIN)} or package.module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise CompileError(f"cannot load model {spec!r}: {error}") from error
    result = function()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise CompileError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, example_inputs = result
    return model, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def max_error(expected: Any, actual: Any) -> float:
    """Largest absolute difference over all tensors of two same-structured results."""
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(expected_leaves) != len(actual_leaves):
        return math.inf
    errors = [(e.double() - a.double()).abs().max().item() for e, a in zip(expected_leaves, actual_leaves)
              if isinstance(e, torch.Tensor) and e.numel()]
    return max(errors, default=0.0)
