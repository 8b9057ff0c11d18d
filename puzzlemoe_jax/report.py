"""What a conversion did, as data and as plain-text tables.

``ConvertReport``/``LayerReport`` are what ``conversion.convert_checkpoint`` returns; ``summary``
prints sizes and per-layer statistics, ``pair_rows``/``format_table`` the merge statistics with
one row per (layer, pair, matrix).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

COLUMNS = ("layer", "pair", "matrix", "similar", "salient_i", "salient_j", "kept_i", "kept_j",
           "rel_err_i", "rel_err_j", "clamped")


@dataclasses.dataclass
class LayerReport:
    layer: int
    kind: str                 # "dense-mlp" | "experts" | "packed"
    pairs: int = 0
    dropped: int = 0
    expert_bytes_in: int = 0
    expert_bytes_out: int = 0
    frac_similar: float = float("nan")
    rel_err: float = float("nan")
    stats: dict | None = None  # compress.compress_layer statistics (per pair and matrix)


@dataclasses.dataclass
class ConvertReport:
    out: Path
    arch: str
    ratio: float
    dtype: str
    bytes_in: int
    bytes_out: int
    expert_bytes_in: int
    expert_bytes_out: int
    seconds: float
    layers: list[LayerReport]
    stage_seconds: dict = dataclasses.field(default_factory=dict)  # busy seconds of read/merge/write (overlapping)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def summary(rep: ConvertReport) -> str:
    """Sizes before/after, per-layer merge statistics and time, as a plain-text table."""
    lines = [f"{'layer':>5}  {'kind':<9} {'pairs':>5}  {'dropped':>7}  {'experts in':>14}  {'experts out':>14}  "
             f"{'similar':>7}  {'rel.err':>7}"]
    for r in rep.layers:
        stats = (f"{r.frac_similar:7.3f}  {r.rel_err:7.4f}" if r.pairs else f"{'-':>7}  {'-':>7}")
        ein = _mb(r.expert_bytes_in) if r.kind != "dense-mlp" else "-"
        eout = _mb(r.expert_bytes_out) if r.kind != "dense-mlp" else "-"
        lines.append(f"{r.layer:>5}  {r.kind:<9} {r.pairs:>5}  {r.dropped:>7}  {ein:>14}  {eout:>14}  {stats}")
    frac = rep.expert_bytes_out / rep.expert_bytes_in if rep.expert_bytes_in else float("nan")
    lines += [f"experts: {_mb(rep.expert_bytes_in)} -> {_mb(rep.expert_bytes_out)} ({frac:.3f} of the original)",
              f"total:   {_mb(rep.bytes_in)} -> {_mb(rep.bytes_out)}",
              f"ratio {rep.ratio}, dtype {rep.dtype}, {rep.seconds:.1f} s "
              f"({rep.bytes_in / 1e9 / max(rep.seconds, 1e-9):.2f} GB/s of input) -> {rep.out}"]
    if rep.stage_seconds:
        lines.append("time split (busy seconds per stage; stages overlap): " + ", ".join(
            f"{k} {v:.1f} s" for k, v in rep.stage_seconds.items()))
    return "\n".join(lines)


def pair_rows(layer_stats: Mapping, layer: int | str = 0) -> list[dict]:
    """Rows for one layer's ``compress_layer`` stats (fractions as %, clamps summed)."""
    rows = []
    for p, (i, j) in enumerate(np.asarray(layer_stats["pairs"])):
        for name, s in layer_stats.items():
            if name in ("pairs", "dropped"):
                continue
            pct = lambda key: f"{100 * float(s[key][p]):.1f}%"
            clamped = int(s["rounded_to_zero"][p] + s["rounded_to_min"][p] + s["saturated"][p])
            rows.append(dict(layer=layer, pair=f"{i}+{j}", matrix=name, similar=pct("frac_similar"),
                             salient_i=pct("frac_salient_i"), salient_j=pct("frac_salient_j"),
                             kept_i=pct("frac_kept_i"), kept_j=pct("frac_kept_j"),
                             rel_err_i=f"{float(s['rel_err_i'][p]):.4f}",
                             rel_err_j=f"{float(s['rel_err_j'][p]):.4f}", clamped=clamped))
    return rows


def format_table(rows: Iterable[Mapping], columns: Iterable[str] = COLUMNS) -> str:
    """Plain fixed-width text table."""
    rows, columns = list(rows), list(columns)
    widths = [max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns)] + [line([r[c] for c in columns]) for r in rows])
