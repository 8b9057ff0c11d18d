"""The one implementation switch of the packed kernels.

``IMPLS``: "auto" (the fastest that runs here: the Mosaic kernels on a Hopper GPU, the Triton
kernels on other GPUs, the jnp reference elsewhere), "reference" (plain jnp, any backend), "triton" (Pallas-Triton kernels, any NVIDIA GPU;
"pallas" is an alias), "mosaic" (Pallas Mosaic-GPU kernels, Hopper only).  ``resolve_impl`` turns
a choice into what runs and refuses, with one line, what cannot run on this backend: a GPU kernel
without a GPU runs only in Pallas' CPU interpreter, and only when the caller asks for it with
``interpret=True`` (the tests do).  Backends are imported when first used.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels import gpu
from kernels.reference import dense_moe_ffn_reference, packed_moe_ffn_reference, pair_gemm_reference

IMPLS = ("auto", "reference", "triton", "mosaic")
ALIASES = {"pallas": "triton"}
IMPL_CHOICES = IMPLS + tuple(ALIASES)   # what CLIs accept
IMPL_HELP = ("how MoE experts run: auto (Mosaic kernels on Hopper GPUs, Triton kernels on other GPUs, "
             "the jnp reference on a CPU), reference, triton (alias pallas; any NVIDIA GPU) or mosaic (Hopper GPUs)")

# "auto" for one pair: the Triton pair kernel up to this many tokens per expert (large matrices,
# K*N >= 2**24, e.g. Mixtral; smaller ones up to PAIR_KERNEL_MAX_M_SMALL); decode + two XLA dots above
PAIR_KERNEL_MAX_M = 128
PAIR_KERNEL_MAX_M_SMALL = 64


class ImplError(ValueError):
    """An implementation name that does not exist or cannot run on this backend."""


def resolve_impl(impl: str, *, interpret: bool = False) -> str:
    """The implementation that runs for ``impl`` here: "reference", "triton" or "mosaic"."""
    impl = ALIASES.get(impl, impl)
    if impl not in IMPLS:
        raise ImplError(f"impl must be one of {', '.join(IMPL_CHOICES)}, got {impl!r}")
    on_gpu = gpu.compute_capability() is not None
    if impl == "auto":
        return ("mosaic" if gpu.is_hopper() else "triton") if on_gpu else "reference"
    if impl == "reference" or interpret:
        return impl
    if not on_gpu:
        raise ImplError(f"impl {impl!r} runs Pallas GPU kernels and this machine's JAX backend is "
                        f"{jax.default_backend()}; use impl 'auto' or 'reference' (tests pass interpret=True "
                        "to run the kernels in the slow CPU interpreter)")
    if impl == "mosaic" and not gpu.is_hopper():
        cc = ".".join(map(str, gpu.compute_capability()))
        raise ImplError(f"impl 'mosaic' needs a Hopper GPU (compute capability 9.x), this one is {cc}; "
                        "use impl 'triton' or 'auto'")
    return impl


def pair_kernel_wins(m: int, k: int, n: int) -> bool:
    """Whether "auto" runs the Triton pair kernel for ``m`` tokens per expert (else decode + dots)."""
    return m <= (PAIR_KERNEL_MAX_M if k * n >= 1 << 24 else PAIR_KERNEL_MAX_M_SMALL)


def pair_gemm(a_i: jax.Array, a_j: jax.Array, words: jax.Array, *, transposed: bool = False,
              impl: str = "auto", config=None, interpret: bool = False,
              out_dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """``(A_i @ W_i, A_j @ W_j)`` for one packed pair: ``words`` uint16 [K, N] (or [N, K] when
    ``transposed``), ``a_i`` [M_i, K], ``a_j`` [M_j, K].  ``config``: a ``TritonConfig`` or a
    ``MosaicConfig`` for the chosen kernel (default: its tile table).  "mosaic" takes transposed
    words only."""
    run = resolve_impl(impl, interpret=interpret)
    if words.ndim != 2:
        raise ValueError(f"words must be a 2-D [K, N] or [N, K] array, got shape {words.shape}")
    K, N = (words.shape[1], words.shape[0]) if transposed else words.shape
    if a_i.shape[-1] != K or a_j.shape[-1] != K:
        raise ValueError(f"activations must have K={K} columns, got {a_i.shape}, {a_j.shape}")
    if impl == "auto" and run == "mosaic" and not transposed:   # the Mosaic kernel reads [N, K] words
        run = "triton"
    if impl == "auto" and run == "triton" and not pair_kernel_wins(max(a_i.shape[0], a_j.shape[0]), K, N):
        run = "reference"
    if run == "reference":
        return pair_gemm_reference(a_i, a_j, words, transposed=transposed, out_dtype=out_dtype)
    if run == "mosaic":
        if not transposed:
            raise ValueError('impl "mosaic" takes transposed words [N, K] (transposed=True)')
        from kernels.mosaic_gemm import mosaic_pair_gemm  # noqa: PLC0415 (backends load when used)
        return mosaic_pair_gemm(a_i, a_j, words, config=config, interpret=interpret, out_dtype=out_dtype)
    from kernels.triton_gemm import triton_pair_gemm  # noqa: PLC0415
    return triton_pair_gemm(a_i, a_j, words, transposed=transposed, config=config, interpret=interpret,
                            out_dtype=out_dtype)


def packed_moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, experts, *,
                   impl: str = "auto", interpret: bool = False, out_dtype=None,
                   mosaic_words: dict | None = None, configs: tuple = (None, None)) -> jax.Array:
    """Routed-expert FFN of a packed layer: ``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])``.

    ``experts``: a ``puzzlemoe_jax.experts.PackedExperts`` (or anything with its ``pairs``,
    ``packed``, ``dense_ids``, ``dense`` and ``num_experts``); ids of dropped experts contribute
    nothing.  ``mosaic_words``: ``mosaic_ffn.to_mosaic_words(experts.packed)`` made once for
    "mosaic" (else made per call); with them ``experts.packed`` may be empty (a model holding only
    the Mosaic layout), and other implementations transpose the words back.  ``configs``:
    overrides of the (gate+up, down) launches' settings (``TritonConfig`` / ``MosaicConfig``).
    ``out_dtype`` defaults to ``x.dtype``.
    """
    run = resolve_impl(impl, interpret=interpret)
    out_dtype = out_dtype or x.dtype
    unfused = run == "reference" or experts.pairs.shape[0] == 0 or topk_ids.shape[0] == 0
    if not experts.packed:   # words given only in the Mosaic layout
        if mosaic_words is None:
            raise ValueError("experts.packed is empty: pass the words as mosaic_words")
        if unfused or run != "mosaic":
            from kernels.mosaic_ffn import from_mosaic_words  # noqa: PLC0415
            experts = dataclasses.replace(experts, packed=from_mosaic_words(mosaic_words))
    if unfused:
        return packed_moe_ffn_reference(x, topk_ids, topk_weights, experts, out_dtype)
    if run == "mosaic":
        if mosaic_words is None:
            from kernels.mosaic_ffn import to_mosaic_words  # noqa: PLC0415
            mosaic_words = to_mosaic_words(experts.packed)
        return _mosaic_layer(x, topk_ids, topk_weights, experts, mosaic_words, out_dtype=jnp.dtype(out_dtype),
                             configs=tuple(configs), interpret=interpret)
    return _triton_layer(x, topk_ids, topk_weights, experts, out_dtype=jnp.dtype(out_dtype), configs=tuple(configs),
                         interpret=interpret)


# Each layer's kernels run inside a jit of their own: a model's layers of one shape then share one
# lowering (one Pallas lowering and one compiled kernel per shape, not per layer).
@functools.partial(jax.jit, static_argnames=("out_dtype", "configs", "interpret"))
def _mosaic_layer(x, topk_ids, topk_weights, experts, words, *, out_dtype, configs, interpret):
    from kernels.mosaic_ffn import mosaic_moe_ffn  # noqa: PLC0415
    return mosaic_moe_ffn(x, topk_ids, topk_weights, experts, words, out_dtype=out_dtype, configs=configs,
                          interpret=interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype", "configs", "interpret"))
def _triton_layer(x, topk_ids, topk_weights, experts, *, out_dtype, configs, interpret):
    from kernels.triton_ffn import triton_moe_ffn  # noqa: PLC0415
    return triton_moe_ffn(x, topk_ids, topk_weights, experts, out_dtype=out_dtype, configs=configs,
                          interpret=interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def _triton_dense_layer(x, topk_ids, topk_weights, weights, *, out_dtype, interpret):
    from kernels.triton_ffn import triton_dense_moe_ffn  # noqa: PLC0415
    return triton_dense_moe_ffn(x, topk_ids, topk_weights, weights, out_dtype=out_dtype, interpret=interpret)


def dense_moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, weights, *, impl: str = "auto",
                  interpret: bool = False, out_dtype=None) -> jax.Array:
    """Routed-expert FFN of an uncompressed layer (``weights``: ``w_gate``, ``w_up``, ``w_down``
    [E, K, N]); ids ``>= E`` contribute nothing.  "reference": grouped by expert through
    ``jax.lax.ragged_dot`` (which streams every expert); "triton" and "mosaic": the grouped Triton
    kernel, which reads only the experts that have tokens."""
    run = resolve_impl(impl, interpret=interpret)
    out_dtype = out_dtype or x.dtype
    if run == "reference" or topk_ids.shape[0] == 0:
        return dense_moe_ffn_reference(x, topk_ids, topk_weights, weights, out_dtype)
    return _triton_dense_layer(x, topk_ids, topk_weights, dict(weights), out_dtype=jnp.dtype(out_dtype),
                               interpret=interpret)
