"""One MoE layer's compressed experts: the ``PackedExperts`` arrays and the matrix names.

Expert matrices use the Flax ``x @ W`` layout: ``w_gate``/``w_up`` ``[E, H, I]``,
``w_down`` ``[E, I, H]``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from puzzlemoe_jax import codec

MATRICES = ("w_gate", "w_up", "w_down")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedExperts:
    """One MoE layer's experts after compression: packed pairs plus the experts left dense.

    ``packed[name]`` is uint16 ``[P, K, N]`` (codec layout, expert ``pairs[p, 0]`` is "i",
    ``pairs[p, 1]`` is "j"); ``dense[name]`` holds experts ``dense_ids`` unchanged.  Experts in
    ``dropped_ids`` (the dropping baseline) have no weights: the router must never pick them.
    """
    pairs: jax.Array                 # int32 [P, 2]
    packed: dict[str, jax.Array]     # name -> uint16 [P, K, N]
    dense_ids: jax.Array             # int32 [E - 2P - D]
    dense: dict[str, jax.Array]      # name -> [E - 2P - D, K, N]
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    dropped_ids: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((0,), jnp.int32))

    def unpack(self, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
        """Decoded ``[E, K, N]`` weights of every expert (zeros for dropped ones): the reference."""
        out = {}
        for name, words in self.packed.items():
            hat_i, hat_j = codec.decode(words)
            dense = self.dense[name]
            full = jnp.zeros((self.num_experts,) + dense.shape[1:], dtype)
            full = full.at[self.pairs[:, 0]].set(hat_i.astype(dtype))
            full = full.at[self.pairs[:, 1]].set(hat_j.astype(dtype))
            out[name] = full.at[self.dense_ids].set(dense.astype(dtype))
        return out

    def nbytes(self) -> int:
        """Bytes of expert weights held (packed + dense)."""
        return sum(int(x.size) * x.dtype.itemsize for x in (*self.packed.values(), *self.dense.values()))
