"""Plot speedup vs M of the pair kernels over XLA's two bf16 dots, from bench_kernel.py's JSON
(Pallas-Triton, solid) and optionally bench_mosaic.py's ``--variants default`` JSON (Mosaic, dashed).

    python3 benchmarks/plot_speedup.py bench_kernel.json speedup_vs_m.png [layer.json[,layer2.json...]] [--mosaic m1.json[,m2.json...]]

Comma-separated files are merged (a later run's row replaces an earlier one for the same shape and M, or T).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tables import merged_rows  # noqa: E402


def main(src, dst, layer=None, mosaic=None):
    res = json.load(open(src))
    fig, axes = plt.subplots(1, 2 if layer else 1, figsize=(13 if layer else 7.5, 4.8), squeeze=False)
    ax = axes[0][0]
    shapes = sorted({r["shape"] for r in res["rows"]}, key=lambda s: [r["shape"] for r in res["rows"]].index(s))
    mos = merged_rows(mosaic.split(","), lambda r: (r["shape"], r["m"])) if mosaic else []
    for n, s in enumerate(shapes):
        rows = [r for r in res["rows"] if r["shape"] == s]
        color = f"C{n}"
        ax.plot([r["m"] for r in rows], [r["kernel"]["speedup"] for r in rows], "o-", color=color,
                label=f"{s} [{rows[0]['k']}x{rows[0]['n']}] Triton")
        pts = sorted((r["m"], r["timings"]["mosaic_default"]["speedup"]) for r in mos
                     if r["shape"] == s and "speedup" in r["timings"].get("mosaic_default", {}))
        if pts:
            ax.plot(*zip(*pts), "s--", color=color, label=f"{s} Mosaic (SWAR)")
    ax.axhline(2.0, color="gray", ls="--", lw=1, label="2x (ideal, memory-bound)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per expert M")
    ax.set_ylabel("speedup over two bf16 XLA dots")
    ax.set_title(f"Pair decode-GEMM, {res['info']['device']} (CUPTI medians)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if layer:
        files = layer.split(",")
        lr = json.load(open(files[-1]))
        rows = sorted(merged_rows(files, lambda r: r["T"]), key=lambda r: r["T"])
        ax = axes[0][1]
        ax.plot([r["T"] for r in rows], [r["packed"]["speedup"] for r in rows], "o-", label="packed layer (fused Triton kernels)")
        mos_rows = [r for r in rows if "packed_mosaic" in r]
        if mos_rows:
            ax.plot([r["T"] for r in mos_rows], [r["packed_mosaic"]["speedup"] for r in mos_rows], "s--",
                    label="packed layer (grouped Mosaic kernel, impl='mosaic')")
        ax.axhline(1.8, color="gray", ls="--", lw=1, label="1.8x target")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in the step (decode batch or prefill)")
        ax.set_ylabel("speedup over uncompressed XLA layer")
        s = lr["shape"]
        ax.set_title(f"MoE layer step E={s['E']} H={s['H']} I={s['I']} top-{s['topk']}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    args = sys.argv[1:]
    mosaic = None
    if "--mosaic" in args:
        i = args.index("--mosaic")
        mosaic = args[i + 1]
        del args[i:i + 2]
    main(*args, mosaic=mosaic)
