"""JAX's persistent compilation cache for the command-line tools: on by default, so a model's
kernels and steps compile once per machine, not once per run.

``add_argument(ap)`` adds ``--compile-cache DIR`` (default ``$PUZZLEMOE_COMPILE_CACHE`` or
``~/.cache/puzzlemoe_jax/jax``; ``none`` turns it off); ``enable(args.compile_cache)`` applies it.
A cache directory set through JAX's own ``JAX_COMPILATION_CACHE_DIR`` is left as it is.
"""
from __future__ import annotations

import os

DEFAULT = os.path.join(os.path.expanduser("~"), ".cache", "puzzlemoe_jax", "jax")


def add_argument(ap) -> None:
    ap.add_argument("--compile-cache", default=os.environ.get("PUZZLEMOE_COMPILE_CACHE", DEFAULT), metavar="DIR",
                    help="JAX persistent compilation cache directory ('none': off; default %(default)s)")


def enable(path: str | None) -> str | None:
    """Turn the persistent cache on at ``path`` (None or "none": leave it off); returns the directory used."""
    import jax  # noqa: PLC0415
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not path or path.lower() == "none":
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
