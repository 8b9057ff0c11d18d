"""Merge statistics as printable rows: one row per (layer, pair, matrix)."""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

COLUMNS = ("layer", "pair", "matrix", "similar", "salient_i", "salient_j", "kept_i", "kept_j",
           "rel_err_i", "rel_err_j", "clamped")


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
