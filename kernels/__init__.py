"""Pallas GPU kernels for packed expert pairs, their jnp references and the implementation switch.

Imports only jax and ``puzzlemoe_jax.codec``; the Triton and Mosaic backends load when first used.
"""
from kernels.api import (  # noqa: F401
    IMPL_CHOICES,
    IMPL_HELP,
    IMPLS,
    ImplError,
    dense_moe_ffn,
    packed_moe_ffn,
    pair_gemm,
    resolve_impl,
)
