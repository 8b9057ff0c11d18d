"""FP8 (e4m3) checkpoints with 128x128 block scales, as DeepSeek-V3/R1 and Kimi-K2 ship them.

A weight ``X.weight`` stored as ``F8_E4M3`` ``[M, N]`` comes with ``X.weight_scale_inv`` float32
``[ceil(M/128), ceil(N/128)]``; the real weight is ``fp8 * scale`` blockwise (DeepSeek's
``weight_dequant``).  ``hf_layout.hf_plan`` records the pairs (``Plan.scales``), ``check_plan``
checks them with ``check_scales``, and the converter reads through ``dequantizing`` so every
FP8 tensor arrives dequantized in float32 (then cast to the output dtype like any other).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from puzzlemoe_jax.safetensors_io import CheckpointError

BLOCK = 128
FP8 = "F8_E4M3"
SUFFIX = "_scale_inv"


def scale_names(sources: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """{planned weight: its ``weight_scale_inv``} for the planned weights that have one in ``names``."""
    names = set(names)
    return {s: s + SUFFIX for s in sources if s + SUFFIX in names}


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], *(math.ceil(d / BLOCK) for d in shape[-2:]))


def check_scales(scales: Mapping[str, str], ckpt, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Each FP8 weight is F8_E4M3 with a float32 scale of the block shape; an FP8 weight without
    a scale is refused (by ``check_plan``'s dtype check)."""
    for name, sname in scales.items():
        w, s = ckpt.tensors.get(name), ckpt.tensors[sname]
        if w is None:
            continue   # reported as missing by check_plan
        if w.dtype != FP8:
            raise CheckpointError(f"{w.file}: tensor {name!r} has a {sname.rsplit('.', 1)[-1]} but dtype {w.dtype}, "
                                  f"expected {FP8}")
        want = scale_shape(expected[name])
        if s.dtype != "F32" or s.shape != want:
            raise CheckpointError(f"{s.file}: tensor {sname!r} is {list(s.shape)} {s.dtype}, expected {list(want)} F32 "
                                  f"({BLOCK}x{BLOCK} blocks; quantization_config.weight_block_size must be "
                                  f"[{BLOCK}, {BLOCK}])")


def dequantize(w: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """float32 ``w * scale_inv`` with each scale covering a 128x128 block of the last two axes."""
    m, n = w.shape[-2:]
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), BLOCK, axis=-2), BLOCK, axis=-1)
    return w.astype(np.float32) * s[..., :m, :n]


class dequantizing:
    """A ``SafetensorsDir`` whose ``read`` returns the FP8 weights of ``scales`` dequantized."""

    def __init__(self, ckpt, scales: Mapping[str, str]):
        self.ckpt, self.scales = ckpt, dict(scales)

    def read(self, name: str, *args, **kwargs) -> np.ndarray:
        a = self.ckpt.read(name, *args, **kwargs)
        if name not in self.scales:
            return a
        out = dequantize(a, self.ckpt.read(self.scales[name]))
        if not np.isfinite(out).all():
            raise CheckpointError(f"{self.ckpt.tensors[name].file}: tensor {name!r} has non-finite FP8 values")
        return out

    def __getattr__(self, attr):
        return getattr(self.ckpt, attr)
