"""SWAR decode of packed words for the Mosaic-GPU kernels: two 16-bit words per 32-bit register
op, each half decoded with the same masks and offset (no carry crosses the halves because each
half's sign + field + offset stays below 0x10000 and the masks are built per half).

Two forms of the same result:

* "swar": each expert's mask from a shift, an AND and a multiply by 0xFFFF;
* "prmt": each mask from one byte permute (``prmt`` replicates the sign bit of a selected byte, so a
  mask bit shifted to bit 15 of its half becomes 0xFFFF or 0), and expert i's sign kept in the
  masked field before the offset is added: fewer integer-pipe instructions per word pair.

``decode_pairs_swar`` / ``decode_pairs_prmt`` are the arithmetic in jnp (tests compare both with the
codec on every word pair); ``decode_registers`` is the same arithmetic on the registers of a
WGMMA-layout array (``plgpu.inline_mgpu``), which only runs on a Hopper GPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, vector

from puzzlemoe_jax import codec

SWAR_FIELD, SWAR_OFFSET, SWAR_SIGN, SWAR_ONES = 0x0FFF0FFF, 0x38003800, 0x80008000, 0x00010001
SWAR_SIGN_FIELD = SWAR_SIGN | SWAR_FIELD
# prmt selector: result bytes 0-1 the sign of byte 1 replicated, bytes 2-3 the sign of byte 3
PRMT_HALF_SIGNS = 0xBB99


def _signed(v: int) -> int:
    """A 32-bit pattern as the signed value an i32 MLIR constant takes."""
    return v - (1 << 32) if v >= 1 << 31 else v


def decode_pairs_swar(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 lanes holding two words each -> (expert i, expert j) uint32 lanes of two bf16 bit
    patterns each: the math of the in-kernel SWAR decode, in jnp (tests compare it with the codec)."""
    u = jnp.uint32
    x = x.astype(u)
    base = (x & u(SWAR_FIELD)) + u(SWAR_OFFSET)
    mask_i = ((x >> codec.MASK_I_BIT) & u(SWAR_ONES)) * u(0xFFFF)
    mask_j = ((x >> codec.MASK_J_BIT) & u(SWAR_ONES)) * u(0xFFFF)
    return (base | (x & u(SWAR_SIGN))) & mask_i, (base | ((x << 1) & u(SWAR_SIGN))) & mask_j


def decode_pairs_prmt(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The "prmt" form of ``decode_pairs_swar`` in jnp (``half_signs`` stands for the byte permute)."""
    u = jnp.uint32
    x = x.astype(u)
    half_signs = lambda t: ((t >> 15) & u(SWAR_ONES)) * u(0xFFFF)  # noqa: E731
    base_i = (x & u(SWAR_SIGN_FIELD)) + u(SWAR_OFFSET)
    base_j = (base_i & ~u(SWAR_SIGN)) | ((x << 1) & u(SWAR_SIGN))
    return base_i & half_signs(x << (15 - codec.MASK_I_BIT)), base_j & half_signs(x << (15 - codec.MASK_J_BIT))


def decode_registers(words, form: str):
    """In-kernel SWAR decode at the register level (``plgpu.inline_mgpu``): each 32-bit register
    of the WGMMA-layout uint16 array holds two words; decode both with 32-bit ops in ``form``
    ("swar" or "prmt", the same result)."""
    layout = plgpu.Layout.WGMMA
    out = plgpu.ShapeDtypeStruct(words.shape, jnp.bfloat16, layout=layout)

    @plgpu.inline_mgpu(arg_types=(layout,), return_type=(out, out))
    def dec(ctx, w):
        del ctx
        i32, bf16 = ir.IntegerType.get_signless(32), ir.BF16Type.get()
        regs_i, regs_j = np.empty_like(w.registers), np.empty_like(w.registers)
        for idx, reg in np.ndenumerate(w.registers):
            n = ir.VectorType(reg.type).shape[0]
            if form == "prmt":
                regs_i[idx], regs_j[idx] = _prmt_pair(reg, ir.VectorType.get([n], bf16))
                continue
            vt = ir.VectorType.get([n // 2], i32)

            def c(v, vt=vt):   # i32 splat
                return arith.constant(vt, ir.DenseElementsAttr.get_splat(vt, ir.IntegerAttr.get(i32, _signed(v))))
            x = vector.bitcast(vt, reg)
            base = arith.addi(arith.andi(x, c(SWAR_FIELD)), c(SWAR_OFFSET))
            ones = lambda bit: arith.muli(arith.andi(arith.shrui(x, c(bit)), c(SWAR_ONES)), c(0xFFFF))  # noqa: E731
            b_i = arith.andi(arith.ori(base, arith.andi(x, c(SWAR_SIGN))), ones(codec.MASK_I_BIT))
            b_j = arith.andi(arith.ori(base, arith.andi(arith.shli(x, c(1)), c(SWAR_SIGN))), ones(codec.MASK_J_BIT))
            bt = ir.VectorType.get([n], bf16)
            regs_i[idx], regs_j[idx] = vector.bitcast(bt, b_i), vector.bitcast(bt, b_j)
        return (mgpu.FragmentedArray(_registers=regs_i, _layout=w.layout, _is_signed=None),
                mgpu.FragmentedArray(_registers=regs_j, _layout=w.layout, _is_signed=None))

    return dec(words)


def _prmt_pair(reg, out_type):
    """One register of two words -> (expert i, expert j) registers of ``out_type``, the "prmt" form."""
    i32 = ir.IntegerType.get_signless(32)
    if mgpu.utils.bitwidth(reg.type) != 32:
        raise ValueError(f"the prmt decode takes registers of two 16-bit words, got {reg.type}")

    def c(v):
        return arith.constant(i32, _signed(v))

    def half_signs(t):
        return mgpu.utils.prmt(t, t, c(PRMT_HALF_SIGNS))

    x = mgpu.utils.bitcast(reg, i32)
    base_i = arith.addi(arith.andi(x, c(SWAR_SIGN_FIELD)), c(SWAR_OFFSET))
    sign_j = arith.andi(arith.shli(x, c(1)), c(SWAR_SIGN))
    base_j = arith.ori(arith.andi(base_i, c(~SWAR_SIGN & 0xFFFFFFFF)), sign_j)
    b_i = arith.andi(base_i, half_signs(arith.shli(x, c(15 - codec.MASK_I_BIT))))
    b_j = arith.andi(base_j, half_signs(arith.shli(x, c(15 - codec.MASK_J_BIT))))
    return mgpu.utils.bitcast(b_i, out_type), mgpu.utils.bitcast(b_j, out_type)


DECODE_FORMS = ("swar", "prmt", "select")


def decode(words, form: str):
    """In-kernel decode of a word tile to (expert i, expert j) bf16: "swar" or "prmt"
    (``decode_registers``; GPU only) or "select" (``codec.decode``, one 16-bit word per op; the
    interpreter's form)."""
    return codec.decode(words) if form == "select" else decode_registers(words, form)
