"""GPU decode-GEMM kernels for packed (merged) expert pairs; see kernels/decode_gemm.py."""
from kernels.decode_gemm import (  # noqa: F401
    IMPLS,
    PAIR_IMPLS,
    PAIR_KERNEL_MAX_M,
    PAIR_KERNEL_MAX_M_SMALL,
    TileConfig,
    decode_tile,
    dual_decode_gemm,
    dual_decode_gemm_reference,
    grouped_dual_gemm,
    grouped_dual_gemm_reference,
    layer_config,
    mosaic_layer_words,
    packed_moe_ffn,
    pair_config,
    pair_kernel_wins,
)
