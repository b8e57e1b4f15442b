"""What the convolution passes know of cuDNN: which devices run it, and when it rounds float32 to TF32."""
from __future__ import annotations

import torch

LAYOUT_DEVICES = frozenset({"cuda"})
"""Device types whose convolutions the layout passes rewrite: cuDNN's. (ATen's CPU convolution adds its bias in the
kernel, and CPU graphs run no generated kernels to fuse an epilogue into.)"""


def rounds_to_tf32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether cuDNN runs a convolution of this dtype on this device in TF32: float32 on CUDA, TF32 allowed."""
    return dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32
