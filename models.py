"""Built-in models: the demo decoder and small configs of the model families ember is tested on.

A model spec is a built-in name or `package.module:function` returning `(model, example_inputs)`;
every command and benchmark resolves specs here, so they all use the same definitions.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import sys
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


SIZES = ("tiny", "suite")
"""tiny: odd-sized fp32 configs for tests; suite: the bf16 benchmark configs every benchmark uses."""
SUITE = ("mlp", "gpt2", "llama", "llama_b1", "mixtral", "bert")
BROADER = ("resnet50", "convnext_t", "mobilenet_v2", "mobilenet_v3", "vit_b16", "t5_encoder", "gemma2", "qwen2", "moe64")
"""Architectures ember was not tuned on: convolution networks (MobileNetV3's hard swish and squeeze-and-excitation
among them), a ViT, an encoder with relative position buckets, soft-capped sliding-window attention, a biased-QKV
decoder and a 64-expert MoE, each at its library default."""


def demo(size: str = "tiny") -> ModelAndInputs:
    """The demo decoder with random weights and random tokens (one size)."""
    config = DecoderConfig()
    return Decoder(config).eval(), (torch.randint(0, config.vocab_size, (2, 64)),)


def mlp(size: str = "tiny") -> ModelAndInputs:
    """Linear -> GELU -> Linear: 48->96->48 on 37 rows (tiny), 4096->16384->4096 on 8192 rows in bf16 (suite)."""
    rows, features, hidden = (37, 48, 96) if size == "tiny" else (8192, 4096, 16384)
    model = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features))
    return _sized(model.eval(), (torch.randn(rows, features),), size)


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


def cnn(size: str = "tiny") -> ModelAndInputs:
    """A small CNN on 21x21 images (one size)."""
    return SmallCNN().eval(), (torch.randn(3, 3, 21, 21),)


class SmallUNet(nn.Module):
    """Two down and two up stages with skip connections: encoder activations live until the decoder."""

    def __init__(self, channels: int = 3, width: int = 16):
        super().__init__()

        def block(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU())

        self.down1, self.down2 = block(channels, width), block(width, 2 * width)
        self.middle = block(2 * width, 4 * width)
        self.up2, self.up1 = block(6 * width, 2 * width), block(3 * width, width)
        self.head = nn.Conv2d(width, channels, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        first = self.down1(images)
        second = self.down2(F.max_pool2d(first, 2))
        middle = self.middle(F.max_pool2d(second, 2))
        up = self.up2(torch.cat([F.interpolate(middle, scale_factor=2.0), second], dim=1))
        up = self.up1(torch.cat([F.interpolate(up, scale_factor=2.0), first], dim=1))
        return self.head(up)


def unet(size: str = "tiny") -> ModelAndInputs:
    """A small UNet-style CNN: 2 images of 20x20 (tiny); 16 of 128x128, width 32, bf16 (suite)."""
    if size == "tiny":
        return SmallUNet().eval(), (torch.randn(2, 3, 20, 20),)
    return _sized(SmallUNet(width=32), (torch.randn(16, 3, 128, 128),), size)


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise CompileError("this model needs transformers: pip install 'ember[test]'") from error


def _sized(model: nn.Module, inputs: tuple[torch.Tensor, ...], size: str) -> ModelAndInputs:
    """Suite models run in bf16; tiny ones stay fp32."""
    if size == "suite":
        model = model.to(torch.bfloat16)
        inputs = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs)
    return model.eval(), inputs


def _tokens(model: nn.Module, vocab_size: int, batch: int, length: int, size: str) -> ModelAndInputs:
    """The model as shipped (its config's defaults, a decoder's KV cache included) on random token ids."""
    return _sized(model, (torch.randint(0, vocab_size, (batch, length)),), size)


def gpt2(size: str = "tiny") -> ModelAndInputs:
    """transformers' GPT-2 LM: 2 layers of width 64 (tiny); GPT-2 small, batch 8, 512 tokens (suite)."""
    t = _transformers()
    if size == "tiny":
        config, batch, length = t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=211, n_positions=64,
                                                  bos_token_id=0, eos_token_id=0), 2, 13
    else:
        config, batch, length = t.GPT2Config(), 8, 512
    config.bos_token_id = config.eos_token_id = 0
    return _tokens(t.GPT2LMHeadModel(config), config.vocab_size, batch, length, size)


def _llama_config(t: Any, size: str) -> Any:
    if size == "tiny":
        return t.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, vocab_size=211, max_position_embeddings=64)
    return t.LlamaConfig(hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)


def llama(size: str = "tiny") -> ModelAndInputs:
    """transformers' Llama LM with grouped-query attention; suite: hidden 2048, 8 layers, batch 4, 1024 tokens."""
    t = _transformers()
    config = _llama_config(t, size)
    batch, length = (2, 13) if size == "tiny" else (4, 1024)
    return _tokens(t.LlamaForCausalLM(config), config.vocab_size, batch, length, size)


def llama_b1(size: str = "tiny") -> ModelAndInputs:
    """The same Llama on one sequence of 16 tokens (suite): small, launch-bound work."""
    t = _transformers()
    config = _llama_config(t, size)
    return _tokens(t.LlamaForCausalLM(config), config.vocab_size, 1, 5 if size == "tiny" else 16, size)


def mixtral(size: str = "tiny") -> ModelAndInputs:
    """transformers' Mixtral LM, top-2 routing: 4 experts (tiny); hidden 1024, 4 layers, 8 experts, b4 s512 (suite)."""
    t = _transformers()
    if size == "tiny":
        config = t.MixtralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=96, vocab_size=211, num_local_experts=4, num_experts_per_tok=2,
                                 max_position_embeddings=64)
        batch, length = 2, 13
    else:
        config = t.MixtralConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                 intermediate_size=3584, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                                 max_position_embeddings=2048)
        batch, length = 4, 512
    return _tokens(t.MixtralForCausalLM(config), config.vocab_size, batch, length, size)


def qwen2_moe(size: str = "tiny") -> ModelAndInputs:
    """transformers' Qwen2-MoE LM: routed experts (top-k softmax, not renormalised) beside a gated shared expert;
    3 layers, 6 experts, top-2 (tiny); hidden 1024, 4 layers, 16 experts, top-4, b4 s512 (suite)."""
    t = _transformers()
    if size == "tiny":
        config = t.Qwen2MoeConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=96, moe_intermediate_size=40, shared_expert_intermediate_size=80,
                                  vocab_size=211, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
                                  bos_token_id=0, eos_token_id=0)
        batch, length = 2, 13
    else:
        config = t.Qwen2MoeConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                                  intermediate_size=2816, moe_intermediate_size=704,
                                  shared_expert_intermediate_size=2816, vocab_size=32000, num_experts=16, num_experts_per_tok=4, max_position_embeddings=2048,
                                  bos_token_id=0, eos_token_id=0)
        batch, length = 4, 512
    return _tokens(t.Qwen2MoeForCausalLM(config), config.vocab_size, batch, length, size)


def _tiny_olmoe(t: Any, hidden: int, intermediate: int, experts: int, top_k: int) -> Any:
    """A 2-layer OLMoE config of these widths, 4 heads over 2 KV heads, a 211-word vocabulary."""
    return t.OlmoeConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=intermediate, vocab_size=211, num_experts=experts, num_experts_per_tok=top_k,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)


def olmoe(size: str = "tiny") -> ModelAndInputs:
    """transformers' OLMoE LM, top-k softmax routing (not renormalised): 2 layers, 8 experts, top-2 (tiny); hidden
    1024, 4 layers, 64 experts, top-8, b4 s512 (suite)."""
    t = _transformers()
    if size == "tiny":
        config, batch, length = _tiny_olmoe(t, hidden=64, intermediate=48, experts=8, top_k=2), 2, 13
    else:
        config = t.OlmoeConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                               intermediate_size=512, vocab_size=32000, num_experts=64, num_experts_per_tok=8,
                               max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)
        batch, length = 4, 512
    return _tokens(t.OlmoeForCausalLM(config), config.vocab_size, batch, length, size)


def _bert_config(t: Any, size: str) -> tuple[Any, int, int]:
    if size == "tiny":
        return t.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                            vocab_size=211, max_position_embeddings=64), 2, 13
    return t.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536), 32, 128


def bert(size: str = "tiny") -> ModelAndInputs:
    """transformers' BERT encoder: 2 layers of width 64 (tiny); hidden 384, 6 layers, 12 heads, b32 s128 (suite)."""
    t = _transformers()
    config, batch, length = _bert_config(t, size)
    return _tokens(t.BertModel(config), config.vocab_size, batch, length, size)


def bert_masked(size: str = "tiny") -> ModelAndInputs:
    """BERT as served: token ids and a padding attention mask (each sequence keeps a different number of tokens)."""
    t = _transformers()
    config, batch, length = _bert_config(t, size)
    model, (tokens,) = _tokens(t.BertModel(config), config.vocab_size, batch, length, size)
    kept = torch.arange(batch) * (length // 2) // max(batch - 1, 1) + length // 2  # from half to all of the tokens
    mask = (torch.arange(length)[None, :] < kept[:, None]).long()
    return model, (tokens, mask)


def _images(model: nn.Module, batch: int, side: int, size: str) -> ModelAndInputs:
    """The model as shipped on random images [batch, 3, side, side]."""
    return _sized(model, (torch.randn(batch, 3, side, side),), size)


def resnet50(size: str = "tiny") -> ModelAndInputs:
    """transformers' ResNet classifier: bottleneck stages of depth 1 and 2, widths 16 and 24, 2 images of 37x37
    (tiny); ResNetConfig() as shipped (ResNet-50), 32 images of 224x224 (suite)."""
    t = _transformers()
    if size == "tiny":
        config = t.ResNetConfig(embedding_size=8, hidden_sizes=[16, 24], depths=[1, 2], num_labels=5)
        return _images(t.ResNetForImageClassification(config), 2, 37, size)
    return _images(t.ResNetForImageClassification(t.ResNetConfig()), 32, 224, size)


def convnext_t(size: str = "tiny") -> ModelAndInputs:
    """transformers' ConvNeXt classifier: 2 stages of widths 8 and 16, layer scale 0.5 so that blocks count, 2
    images of 35x35 (tiny); ConvNextConfig() as shipped (ConvNeXt-T), 32 images of 224x224 (suite)."""
    t = _transformers()
    if size == "tiny":
        config = t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 2], layer_scale_init_value=0.5,
                                  image_size=35, num_labels=5)
        return _images(t.ConvNextForImageClassification(config), 2, 35, size)
    return _images(t.ConvNextForImageClassification(t.ConvNextConfig()), 32, 224, size)


def mobilenet_v2(size: str = "tiny") -> ModelAndInputs:
    """transformers' MobileNetV2 classifier (TF "same" padding, ReLU6, depthwise convolutions): depth multiplier
    0.25 on 2 images of 33x33 (tiny); MobileNetV2Config() as shipped (1.0, 224), 32 images of 224x224 (suite).

    transformers initialises its 52 convolutions with std 0.02, which shrinks the logits to about 1e-22 (so any
    result would pass a comparison); they get Kaiming's fan-in init instead, as trained weights would keep
    activations at scale."""
    t = _transformers()
    tiny = size == "tiny"
    config = t.MobileNetV2Config(depth_multiplier=0.25, image_size=33, num_labels=5) if tiny else t.MobileNetV2Config()
    model = t.MobileNetV2ForImageClassification(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    return _images(model, 2 if tiny else 32, 33 if tiny else 224, size)


class InvertedResidual(nn.Module):
    """MobileNetV3's block as torchvision builds it: a 1x1 expansion, a depthwise convolution, an optional
    squeeze-and-excitation gate (average pool, 1x1 down, ReLU, 1x1 up, hard sigmoid), a 1x1 projection; batch norm
    after each convolution, ReLU or hard swish after all but the projection, a residual where the shape is kept."""

    def __init__(self, inputs: int, kernel: int, expanded: int, outputs: int, squeeze: bool, activation: type[nn.Module],
                 stride: int):
        super().__init__()

        def unit(c_in: int, c_out: int, size: int = 1, groups: int = 1, act: type[nn.Module] | None = activation,
                 step: int = 1) -> list[nn.Module]:
            layers = [nn.Conv2d(c_in, c_out, size, step, (size - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
            return layers + ([act()] if act is not None else [])

        layers = unit(inputs, expanded) if expanded != inputs else []
        layers += unit(expanded, expanded, kernel, expanded, step=stride)
        self.expand_and_filter = nn.Sequential(*layers)
        squeezed = max(8, (expanded // 4 + 4) // 8 * 8)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(expanded, squeezed, 1), nn.ReLU(),
                                  nn.Conv2d(squeezed, expanded, 1), nn.Hardsigmoid()) if squeeze else None
        self.project = nn.Sequential(*unit(expanded, outputs, act=None))
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand_and_filter(x)
        if self.gate is not None:
            y = y * self.gate(y)
        y = self.project(y)
        return x + y if self.residual else y


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3 layout at a small width: a hard-swish stem, inverted residual blocks mixing ReLU and
    hard swish, 3x3 and 5x5 depthwise convolutions, squeeze-and-excitation gates, a 1x1 head, average pooling and a
    hard-swish classifier."""

    def __init__(self, classes: int = 5):
        super().__init__()
        settings = [(8, 3, 8, 8, True, nn.ReLU, 2), (8, 3, 24, 12, False, nn.ReLU, 2), (12, 5, 36, 12, True, nn.Hardswish, 1),
                    (12, 5, 36, 16, True, nn.Hardswish, 2)]
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
                                      *(InvertedResidual(*setting) for setting in settings),
                                      nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(images), 1).flatten(1))


def mobilenet_v3(size: str = "tiny") -> ModelAndInputs:
    """MobileNetV3: torchvision's `mobilenet_v3_large()` as shipped, 32 images of 224x224 (suite); at the tiny size
    the same blocks in `MobileNetV3`, widths 8-48, on 2 images of 35x35, with random batch-norm statistics.

    The tiny one is written here because torchvision's PyPI wheel is a CUDA build that does not import beside a CPU
    torch, so the tests could not build torchvision's."""
    if size == "tiny":
        model = MobileNetV3().eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
        return _images(model, 2, 35, size)
    try:
        torchvision = importlib.import_module("torchvision")
    except (ImportError, RuntimeError) as error:
        raise CompileError(f"mobilenet_v3 at the suite size needs torchvision, which does not import: {error}") from error
    return _images(torchvision.models.mobilenet_v3_large(), 32, 224, size)


def vit_b16(size: str = "tiny") -> ModelAndInputs:
    """transformers' ViT classifier: 2 layers of width 36, patches of 5 on 2 images of 20x20 (tiny); ViTConfig() as
    shipped (ViT-B/16), 32 images of 224x224 (suite)."""
    t = _transformers()
    if size == "tiny":
        config = t.ViTConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=4, intermediate_size=60,
                             image_size=20, patch_size=5, num_labels=5)
        return _images(t.ViTForImageClassification(config), 2, 20, size)
    return _images(t.ViTForImageClassification(t.ViTConfig()), 32, 224, size)


def t5_encoder(size: str = "tiny") -> ModelAndInputs:
    """transformers' T5 encoder (relative position buckets, RMS norm, ReLU FFN): 2 layers of width 40 (tiny); t5-base
    dims (T5Config() is t5-small): d_model 768, 12 layers, 12 heads, d_ff 3072, batch 16, 512 tokens (suite)."""
    t = _transformers()
    if size == "tiny":
        config = t.T5Config(d_model=40, d_kv=8, num_heads=4, d_ff=56, num_layers=2, vocab_size=211)
        batch, length = 2, 13
    else:
        config, batch, length = t.T5Config(d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_layers=12), 16, 512
    return _tokens(t.T5EncoderModel(config), config.vocab_size, batch, length, size)


def gemma2(size: str = "tiny") -> ModelAndInputs:
    """transformers' Gemma-2 LM: attention and final-logit soft-capping (so eager attention, as shipped), a head width
    of its own (not hidden/heads), sliding-window layers alternating with global ones. Tiny: 2 layers of width 48,
    4 heads of 16, a window of 8 on 13 tokens; suite: Gemma2Config() as shipped (Gemma-2-2B: hidden 2304, 26 layers,
    8 heads of 256, window 4096, so wider than the sequence; vocab 256000), batch 2, 1024 tokens."""
    t = _transformers()
    if size == "tiny":
        config = t.Gemma2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, query_pre_attn_scalar=16, intermediate_size=72, vocab_size=211,
                                sliding_window=8, max_position_embeddings=64)
        batch, length = 2, 13
    else:
        config, batch, length = t.Gemma2Config(), 2, 1024
    return _tokens(t.Gemma2ForCausalLM(config), config.vocab_size, batch, length, size)


def qwen2(size: str = "tiny") -> ModelAndInputs:
    """transformers' Qwen2 LM (biased QKV, grouped-query attention): 2 layers of width 64 (tiny); Qwen2-1.5B dims:
    hidden 1536, 28 layers, 12 heads, 2 KV heads, tied embeddings, vocab 151936, batch 4, 1024 tokens (suite)."""
    t = _transformers()
    if size == "tiny":
        config = t.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=96, vocab_size=211, max_position_embeddings=64)
        batch, length = 2, 13
    else:
        config = t.Qwen2Config(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                               intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768,
                               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                               tie_word_embeddings=True)
        batch, length = 4, 1024
    return _tokens(t.Qwen2ForCausalLM(config), config.vocab_size, batch, length, size)


def moe64(size: str = "tiny") -> ModelAndInputs:
    """transformers' OLMoE LM with many experts, 64 of them, top-8: 2 layers of width 32, experts 16 wide, on 26
    tokens so that most experts get none (tiny); OlmoeConfig() as shipped: hidden 2048, 16 layers, experts 2048
    wide (13.4B parameters, 25 GiB in bf16, built in fp32 first: 51 GiB at the peak), batch 4, 512 tokens (suite)."""
    t = _transformers()
    if size == "tiny":
        config, batch, length = _tiny_olmoe(t, hidden=32, intermediate=16, experts=64, top_k=8), 2, 13
    else:
        config, batch, length = t.OlmoeConfig(), 4, 512
    return _tokens(t.OlmoeForCausalLM(config), config.vocab_size, batch, length, size)


BUILTIN: dict[str, Callable[[str], ModelAndInputs]] = {
    "demo": demo, "mlp": mlp, "cnn": cnn, "unet": unet, "gpt2": gpt2, "llama": llama, "llama_b1": llama_b1, "mixtral": mixtral,
    "bert": bert, "bert_masked": bert_masked, "qwen2_moe": qwen2_moe, "olmoe": olmoe,
    "resnet50": resnet50, "convnext_t": convnext_t, "mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3,
    "vit_b16": vit_b16,
    "t5_encoder": t5_encoder, "gemma2": gemma2, "qwen2": qwen2, "moe64": moe64,
}


def load(spec: str, size: str = "tiny", device: str | torch.device | None = None) -> ModelAndInputs:
    """Resolve a model spec: a built-in name or `package.module:function` returning (model, example_inputs).

    Built-ins come in two sizes (SIZES); `device` builds the model there ("meta" for shapes only).
    """
    if size not in SIZES:
        raise CompileError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model, example_inputs = _build(spec, size)
    return model, example_inputs


def _build(spec: str, size: str) -> ModelAndInputs:
    if spec in BUILTIN:
        return BUILTIN[spec](size)
    module_name, colon, function_name = spec.partition(":")
    if not colon or not module_name or not function_name:
        raise CompileError(f"unknown model {spec!r}: use one of {', '.join(BUILTIN)} or package.module:function")
    function = _resolve(spec, module_name, function_name)
    try:
        inspect.signature(function).bind()
    except TypeError as error:
        raise CompileError(f"{spec} must be callable without arguments and return (model, example_inputs): {error}") from None
    except ValueError:  # a builtin without a signature: call it and see
        pass
    try:
        result = function()
    except Exception as error:
        raise CompileError(f"{spec} raised {type(error).__name__}: {error}") from error
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise CompileError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, example_inputs = result
    if isinstance(example_inputs, list):  # a list of arguments, as ember.compile takes one
        example_inputs = tuple(example_inputs)
    return model, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _resolve(spec: str, module_name: str, function_name: str) -> Callable[[], Any]:
    """`module:function`, with the current directory searched first, as `python -m` would."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CompileError(f"cannot load model {spec!r}: {error} (searched the current directory {cwd} and "
                           "the installed packages)") from error
    except Exception as error:
        raise CompileError(f"cannot load model {spec!r}: importing {module_name} raised "
                           f"{type(error).__name__}: {error}") from error
    finally:
        if added:
            sys.path.remove(cwd)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise CompileError(f"cannot load model {spec!r}: {module_name} has no function {function_name!r}")
    return function


def max_error(expected: Any, actual: Any) -> float:
    """Largest absolute difference over all tensors of two same-structured results."""
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(expected_leaves) != len(actual_leaves):
        return math.inf
    errors = [(e.double() - a.double()).abs().max().item() for e, a in zip(expected_leaves, actual_leaves)
              if isinstance(e, torch.Tensor) and e.numel()]
    return max(errors, default=0.0)
