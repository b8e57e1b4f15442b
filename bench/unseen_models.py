"""Models ember was never tuned on, in no suite: tiny configs of 21 more transformers architectures (decoders with
sliding windows, parallel blocks and partial rotary; encoders with disentangled or factorised attention; CNNs with
grouped, depthwise and squeeze-and-excitation blocks; windowed and hybrid vision transformers), random weights,
through both entry points with generated kernels, each output's max error against eager and its tolerance (batch
norms given random statistics, all-zero weights made random: an output of zeros would agree whatever ran).
On the CPU the generated kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set when no GPU is asked for);
on a GPU, run it in bfloat16 too. --layout also rewrites CPU convolutions as cuDNN's are (the passes' CPU check).
Usage: python bench/unseen_models.py [--device cpu|cuda] [--dtype float32|bfloat16] [--layout] [--out DIR] [names...]
"""
from __future__ import annotations

import argparse
import os
import sys

_device_only = argparse.ArgumentParser(add_help=False)
_device_only.add_argument("--device", default="cpu")
if _device_only.parse_known_args(sys.argv[1:])[0].device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch and triton are imported

import torch  # noqa: E402
import transformers as t  # noqa: E402

import ember  # noqa: E402
from ember import models  # noqa: E402
from ember.optimizer import cudnn  # noqa: E402
from ember.tolerance import result_tolerance  # noqa: E402

from common import environment, write_results  # noqa: E402

VOCAB = 97
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)


def _text(cls, config):
    return cls(config), (torch.randint(0, VOCAB, (2, 9)),)


def _image(cls, config):
    return cls(config), (torch.randn(2, 3, 32, 32),)


CASES = {
    "mistral_sliding": lambda: _text(t.MistralForCausalLM, t.MistralConfig(**TEXT, num_key_value_heads=2, sliding_window=4)),
    "phi": lambda: _text(t.PhiForCausalLM, t.PhiConfig(**TEXT)),
    "gpt_neox": lambda: _text(t.GPTNeoXForCausalLM, t.GPTNeoXConfig(**TEXT)),
    "falcon": lambda: _text(t.FalconForCausalLM, t.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4)),
    "opt": lambda: _text(t.OPTForCausalLM, t.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, ffn_dim=48, max_position_embeddings=64,
                                                       word_embed_proj_dim=32)),
    "stablelm": lambda: _text(t.StableLmForCausalLM, t.StableLmConfig(**TEXT, num_key_value_heads=2)),
    "gemma": lambda: _text(t.GemmaForCausalLM, t.GemmaConfig(**TEXT, num_key_value_heads=1, head_dim=8)),
    "bloom_alibi": lambda: _text(t.BloomForCausalLM, t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    "distilbert": lambda: _text(t.DistilBertModel, t.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                                                                      hidden_dim=48, max_position_embeddings=64)),
    "roberta": lambda: _text(t.RobertaModel, t.RobertaConfig(**TEXT)),
    "albert": lambda: _text(t.AlbertModel, t.AlbertConfig(**TEXT, embedding_size=16)),
    "deberta_v2": lambda: _text(t.DebertaV2Model, t.DebertaV2Config(**TEXT)),
    "electra": lambda: _text(t.ElectraModel, t.ElectraConfig(**TEXT, embedding_size=16)),
    "regnet": lambda: _image(t.RegNetForImageClassification, t.RegNetConfig(embedding_size=8, hidden_sizes=[16, 24],
                                                                            depths=[1, 1], groups_width=8)),
    "efficientnet": lambda: _image(t.EfficientNetForImageClassification, t.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320)),
    "swin": lambda: _image(t.SwinForImageClassification, t.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                                                      depths=[1, 1], num_heads=[2, 4], window_size=4)),
    "deit": lambda: _image(t.DeiTForImageClassification, t.DeiTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                                      num_hidden_layers=2, num_attention_heads=4,
                                                                      intermediate_size=48)),
    "convnextv2": lambda: _image(t.ConvNextV2ForImageClassification, t.ConvNextV2Config(hidden_sizes=[8, 16],
                                                                                        depths=[1, 1], num_stages=2)),
    "poolformer": lambda: _image(t.PoolFormerForImageClassification, t.PoolFormerConfig(hidden_sizes=[8, 16, 24, 32],
                                                                                        depths=[1, 1, 1, 1])),
    "segformer": lambda: _image(t.SegformerForSemanticSegmentation, t.SegformerConfig(hidden_sizes=[8, 16, 24, 32],
                                                                                      decoder_hidden_size=32)),
    "dinov2": lambda: _image(t.Dinov2Model, t.Dinov2Config(image_size=32, patch_size=8, hidden_size=32,
                                                           num_hidden_layers=2, num_attention_heads=4)),
    "levit": lambda: _image(t.LevitForImageClassification, t.LevitConfig(image_size=32, hidden_sizes=[16, 24, 32],
                                                                         num_attention_heads=[1, 2, 2],
                                                                         depths=[1, 1, 1], key_dim=[8, 8, 8])),
}


def lively(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with random batch-norm statistics and no all-zero weight (a zero-initialised head or layer scale
    would make its output zero, and a wrong answer agree)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for parameter in model.parameters():
            if parameter.is_floating_point() and not parameter.any():
                parameter.normal_(0.0, 0.1)
    return model


def check(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Both entry points' max error against eager on the model's first output, or the error that stopped it."""
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    model = lively(model).eval().to(device=device, dtype=dtype)
    inputs = tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in inputs)
    row = {"model": name}
    try:
        with torch.no_grad():
            expected = model(*inputs)[0]
            exported = ember.compile(model, inputs, ember.Options(fusion=True))(*inputs)[0]
            torch._dynamo.reset()
            backend = torch.compile(model, backend="ember", options={"fusion": True})(*inputs)[0]
    except Exception as error:  # a model that fails is the finding: recorded, and the sweep goes on
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}", "passed": False}
    errors = {"export_max_err": models.max_error(expected, exported), "backend_max_err": models.max_error(expected, backend)}
    tolerance, scale = result_tolerance(expected), expected.abs().max().item()
    return {**row, **errors, "tolerance": tolerance, "scale": scale,
            "passed": scale > 0 and all(error <= tolerance for error in errors.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--layout", action="store_true", help="rewrite CPU convolutions as cuDNN's are")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if args.layout:
        cudnn.LAYOUT_DEVICES = frozenset({"cpu", "cuda"})
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.names:
        rows.append(check(name, device, dtype))
        print(rows[-1], flush=True)
    lines = [f"{args.dtype}{', CPU convolutions rewritten as on cuDNN' if args.layout else ''}; generated kernels",
             f"{'model':16} {'max |out|':>9} {'export err':>10} {'backend err':>11} {'tol':>8}  ok"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:16} {r['error']}")
        else:
            lines.append(f"{r['model']:16} {r['scale']:9.2e} {r['export_max_err']:10.2e} {r['backend_max_err']:11.2e} "
                         f"{r['tolerance']:8.1e}  "
                         f"{'yes' if r['passed'] else 'NO'}")
    lines.append(f"{sum(r['passed'] for r in rows)} of {len(rows)} agree with eager")
    stem = f"unseen_models_{device.type}_{args.dtype}{'_layout' if args.layout else ''}"
    write_results(args.out, stem, {**environment(device), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
