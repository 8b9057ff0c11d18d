"""Held-out quality of PuzzleMoE vs baselines on the embedded trained tiny MoE models.

    python benchmarks/quality.py [--max-windows 128] [--json benchmarks/quality_results.json]

For each model in models/ (trained from scratch; made by sparse upcycling) and each method x ratio
(PuzzleMoE; uniform averaging; frequency-weighted averaging; dropping the least-routed experts) plus
ablations of PuzzleMoE's open choices at 50 %, converts the checkpoint, then scores
data/heldout.txt (byte-level: bits per byte) with ``puzzlemoe_jax.evaluate``.  Calibration
statistics (routing frequencies, input second moments) come from data/calibration.txt, which is
training text.  Prints a markdown table; writes every figure to JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from puzzlemoe_jax import evaluate  # noqa: E402
from puzzlemoe_jax.calibrate import calibrate_checkpoint  # noqa: E402
from puzzlemoe_jax.checkpoint import convert_checkpoint, load_pretrained  # noqa: E402
from puzzlemoe_jax.merge import MergeConfig  # noqa: E402

MODELS = {"from scratch": ROOT / "models/tiny-moe-scratch", "upcycled": ROOT / "models/tiny-moe-upcycled"}
RUNS = [  # (label, ratio, MergeConfig)
    ("original", 0.0, MergeConfig()),
    *[(f"{m}", r, MergeConfig(method=m)) for r in (0.25, 0.5) for m in ("puzzle", "average", "frequency", "drop")],
    ("puzzle, neuron alignment", 0.5, MergeConfig(align_neurons=True)),
    ("puzzle, activation saliency", 0.5, MergeConfig(saliency="activation")),
    ("puzzle, sequential pairing", 0.5, MergeConfig(pairing="sequential")),
    ("puzzle, threshold 0.3", 0.5, MergeConfig(similarity_threshold=0.3)),
    ("puzzle, threshold 0.8", 0.5, MergeConfig(similarity_threshold=0.8)),
    ("average, neuron alignment", 0.5, MergeConfig(method="average", align_neurons=True)),
    ("frequency, neuron alignment", 0.5, MergeConfig(method="frequency", align_neurons=True)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-windows", type=int, default=128, help="windows of 512 bytes of held-out text")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/quality_results.json"))
    ap.add_argument("--table-only", action="store_true", help="print the table of an existing --json, run nothing")
    args = ap.parse_args(argv)
    if args.table_only:
        return print_table(json.loads(Path(args.json).read_text()))
    heldout = np.frombuffer((ROOT / "data/heldout.txt").read_bytes(), np.uint8).astype(np.int32)
    results = []
    for model_name, src in MODELS.items():
        calibration = calibrate_checkpoint(src, "mixtral", ROOT / "data/calibration.txt")
        base = None
        for label, ratio, cfg in RUNS:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                rep = convert_checkpoint(src, Path(tmp) / "m", "mixtral", ratio=ratio, merge=cfg,
                                         calibration=calibration)
                seconds = time.perf_counter() - t0
                model = load_pretrained(Path(tmp) / "m", impl="reference")
                r = evaluate.evaluate(model, heldout, 512, max_windows=args.max_windows, bytes_per_token=1.0)
            base = r["bits_per_byte"] if base is None else base
            row = {"model": model_name, "method": label, "ratio": ratio, "bits_per_byte": r["bits_per_byte"],
                   "delta_bpb": r["bits_per_byte"] - base, "perplexity": r["perplexity"],
                   "expert_bytes_fraction": rep.expert_bytes_out / rep.expert_bytes_in,
                   "tokens": r["tokens"], "convert_seconds": seconds, "config": dataclasses.asdict(cfg)}
            results.append(row)
            print(f"{model_name:>12} | {label:<28} | {ratio:4.2f} | {row['bits_per_byte']:.4f} | "
                  f"{row['delta_bpb']:+.4f} | {row['expert_bytes_fraction']:.3f}", flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results):
    """Markdown table: perplexity and bits per byte, each with its change vs the original model."""
    print("| model | method | ratio | perplexity | change | bits/byte | change | expert bytes |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["model"]: r["perplexity"] for r in results if r["method"] == "original"}
    for row in results:
        print(f"| {row['model']} | {row['method']} | {int(row['ratio'] * 100)} % | {row['perplexity']:.4f} | "
              f"{row['perplexity'] - base[row['model']]:+.4f} | {row['bits_per_byte']:.4f} | "
              f"{row['delta_bpb']:+.4f} | {row['expert_bytes_fraction']:.3f} |")


if __name__ == "__main__":
    main()
