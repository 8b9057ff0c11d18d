"""Hardware facts read from the device, and the arithmetic every GPU kernel here shares.

The kernels size their launches by the GPU's streaming-multiprocessor count and shared memory per
block; both come from the device when one is present, else from the H100/H200 (the GPUs the tile
tables were tuned on), so configs can also be built and lowered on a CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from puzzlemoe_jax import codec

HOPPER_SMS = 132                 # H100 SXM and H200
HOPPER_SMEM_PER_BLOCK = 227 * 1024
HOPPER_SMEM_PER_SM = 228 * 1024
MIN_K_STEPS = 4                  # a K split keeps at least this many K steps per program


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n``, at least 2 (a Pallas-Triton block size)."""
    return max(2, 1 << (n - 1).bit_length())


def largest_pow2_divisor(x: int, cap: int) -> int:
    """The largest power of two up to ``cap`` that divides ``x``."""
    d = 1
    while d < cap and x % (2 * d) == 0:
        d *= 2
    return d


def _gpu():
    devs = [d for d in jax.devices() if d.platform == "gpu"]
    return devs[0] if devs else None


@functools.cache
def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU, or None without one."""
    dev = _gpu()
    cc = getattr(dev, "compute_capability", None) if dev is not None else None
    if not cc:
        return None
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)


def is_hopper() -> bool:
    cc = compute_capability()
    return cc is not None and cc[0] == 9


@functools.cache
def num_sms() -> int:
    """Streaming multiprocessors of the first GPU (the H100/H200 count without a GPU)."""
    dev = _gpu()
    return int(getattr(dev, "core_count", 0) or HOPPER_SMS) if dev is not None else HOPPER_SMS


def smem_budget(reserve: int = 27 * 1024) -> int:
    """Shared memory per block a kernel may plan with: the Hopper per-block maximum less
    ``reserve`` bytes for the compiler's own scratch and barriers."""
    return HOPPER_SMEM_PER_BLOCK - reserve


def smem_two_per_sm() -> int:
    """Shared memory per block with which two blocks share an SM (each also has 1 KB reserved)."""
    return HOPPER_SMEM_PER_SM // 2 - 2 * 1024


def k_splits(k_steps: int, programs: int, min_programs: int) -> int:
    """The K-split rule of every kernel: double the split (a power of two dividing ``k_steps``)
    while the launch has fewer than ``min_programs`` programs (``programs`` without a split) and
    each program keeps at least ``MIN_K_STEPS`` K steps."""
    split = 1
    while (programs * split < min_programs and k_steps % (2 * split) == 0
           and k_steps // (2 * split) >= MIN_K_STEPS):
        split *= 2
    return split


def silu(x):
    """SiLU written out (``x / (1 + exp(-x))``): lowers in every kernel backend."""
    return x / (1.0 + jnp.exp(-x))


decode = codec.decode   # the one decode: uint16 words -> (expert i, expert j) bf16, usable in kernels
