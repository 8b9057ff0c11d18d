"""The main job: compress the embedded trained tiny MoE to 50 % and compare held-out quality.

    python -m puzzlemoe_jax.demo [--model models/tiny-moe-scratch] [--ratio 0.5] [--max-windows 32]

Converts the Hugging Face checkpoint twice (original, and PuzzleMoE at ``--ratio``), prints the
conversion summaries and the per-pair merge statistics (fraction similar, salient and kept per
expert, relative reconstruction error per expert, exponent clamps), then scores the held-out text
with both and prints perplexity and bits per byte before and after.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np

from kernels import IMPL_CHOICES, IMPL_HELP, ImplError, resolve_impl
from puzzlemoe_jax import compile_cache, evaluate
from puzzlemoe_jax.checkpoint import load_pretrained
from puzzlemoe_jax.conversion import convert_checkpoint
from puzzlemoe_jax.report import format_table, pair_rows, summary

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-moe-scratch",
                    help="Hugging Face Mixtral checkpoint directory (byte-level vocabulary)")
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "heldout.txt", help="held-out text")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--impl", default="auto", choices=IMPL_CHOICES, help=IMPL_HELP)
    compile_cache.add_argument(ap)
    args = ap.parse_args(argv)
    compile_cache.enable(args.compile_cache)
    try:
        resolve_impl(args.impl)
    except ImplError as e:
        raise SystemExit(f"error: {e}") from None
    if not (args.model / "config.json").exists():
        raise SystemExit(f"error: {args.model} has no config.json: the demo needs the repository checkout's "
                         "models/ (pip install -e . from a clone), or pass --model DIR")

    print(f"puzzlemoe-jax demo on {jax.default_backend()}: {args.model.name}, ratio {args.ratio}")
    tokens = np.frombuffer(args.text.read_bytes(), np.uint8).astype(np.int32)
    scores = {}
    with tempfile.TemporaryDirectory(prefix="puzzlemoe-demo-") as tmp:
        for name, ratio in (("original", 0.0), ("puzzlemoe", args.ratio)):
            rep = convert_checkpoint(args.model, Path(tmp) / name, "mixtral", ratio=ratio)
            print(f"\n== {name}: python -m convert mixtral --src {args.model} --out OUT --ratio {ratio}")
            print(summary(rep))
            if ratio:
                print(format_table(row for r in rep.layers if r.stats for row in pair_rows(r.stats, r.layer)))
            model = load_pretrained(Path(tmp) / name, impl=args.impl)
            scores[name] = evaluate.evaluate(model, tokens, args.seq_len, max_windows=args.max_windows,
                                             bytes_per_token=1.0)
    before, after = scores["original"], scores["puzzlemoe"]
    print(f"\nheld-out {args.text.name}, {before['tokens']} bytes in {before['windows']} windows of {args.seq_len}:")
    for name, s in scores.items():
        print(f"  {name:<10} perplexity {s['perplexity']:.4f}  bits/byte {s['bits_per_byte']:.4f}")
    print(f"  change     perplexity {after['perplexity'] - before['perplexity']:+.4f}  "
          f"bits/byte {after['bits_per_byte'] - before['bits_per_byte']:+.4f}")


if __name__ == "__main__":
    main()
