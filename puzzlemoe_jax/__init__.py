"""PuzzleMoE in JAX: merge MoE expert pairs into bit-packed uint16 tensors.

``load_pretrained``/``save_pretrained`` (puzzlemoe_jax.checkpoint) are imported lazily so that
importing the codec alone does not pull in Flax.
"""
__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name):
    if name in __all__:
        from puzzlemoe_jax import checkpoint  # noqa: PLC0415
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'puzzlemoe_jax' has no attribute {name!r}")
