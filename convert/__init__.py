"""Converter CLI: Hugging Face safetensors MoE checkpoints -> PuzzleMoE Flax checkpoints.

    python -m convert {mixtral,qwen2_moe,qwen3_moe,deepseek} --src HF_DIR --out OUT_DIR [--ratio 0.5]

Bad input exits with status 2 and one line ``error: ...`` naming the file/tensor at fault; no
output directory is left behind.  The work is done by ``puzzlemoe_jax.checkpoint.convert_checkpoint``.
"""
from __future__ import annotations

import argparse
import sys

from puzzlemoe_jax.merge import DEFAULT_SIMILARITY, METHODS, MergeConfig
from puzzlemoe_jax.models import ARCHS

DESCRIPTIONS = {
    "mixtral": "Mixtral (mistralai/Mixtral-8x7B-v0.1, 8x22B)",
    "qwen2_moe": "Qwen1.5-MoE / Qwen2-MoE (shared expert with sigmoid gate)",
    "qwen3_moe": "Qwen3-MoE (q/k norms, no shared expert)",
    "deepseek": "DeepSeek-MoE 16B (trust_remote_code layout; config read without running remote code)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert",
                                description="Convert a Hugging Face safetensors MoE checkpoint to a Flax "
                                            "checkpoint, optionally merging expert pairs (PuzzleMoE).")
    sub = p.add_subparsers(dest="arch", required=True, metavar="ARCH",
                           help=" | ".join(ARCHS))
    for arch in ARCHS:
        s = sub.add_parser(arch, help=DESCRIPTIONS[arch], description=DESCRIPTIONS[arch])
        s.add_argument("--src", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
        s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
        s.add_argument("--ratio", type=float, default=0.0,
                       help="fraction of expert memory to save by merging pairs, 0..0.5 (0: no merging)")
        s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="dtype of the unpacked parameters (auto: the checkpoint's)")
        s.add_argument("--similarity-threshold", type=float, default=DEFAULT_SIMILARITY,
                       help="share an element when | |a|-|b| | <= t * max(|a|,|b|) (default 2-sqrt(2))")
        s.add_argument("--pairing", choices=["min_error", "sequential"], default="min_error",
                       help="how experts are paired within a layer")
        s.add_argument("--pairing-sample", type=int, default=MergeConfig.pairing_sample,
                       help="elements per matrix used to estimate pair costs")
        s.add_argument("--method", choices=METHODS, default="puzzle",
                       help="puzzle (dual-mask merge, default) or a baseline: average (uniform merge), "
                            "frequency (routing-frequency-weighted merge), drop (remove the least-routed experts)")
        s.add_argument("--align-neurons", action="store_true",
                       help="permute each pair's second expert's neurons to match the first before merging")
        s.add_argument("--saliency", choices=["magnitude", "activation"], default="magnitude",
                       help="who wins elements the two experts disagree on: |W|^2, or |W|^2 * E[x^2] (calibration)")
        s.add_argument("--calibration-text", metavar="FILE",
                       help="text for routing frequencies / input statistics (needed by --method frequency|drop "
                            "and --saliency activation; loads the whole dense model)")
        s.add_argument("--calibration-windows", type=int, default=32, help="windows of calibration text")
        s.add_argument("--calibration-seq-len", type=int, default=256, help="tokens per calibration window")
        s.add_argument("--strict", action="store_true",
                       help="fail if a merged magnitude does not fit the 5-bit exponent")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
        s.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
        s.add_argument("--verbose", action="store_true",
                       help="also print the per-pair statistics (similar, salient, kept, error, clamps)")
    return p


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def summary(rep) -> str:
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
              f"ratio {rep.ratio}, dtype {rep.dtype}, {rep.seconds:.1f} s -> {rep.out}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    # heavy imports after argument parsing, so --help is fast
    from tqdm import tqdm  # noqa: PLC0415

    from puzzlemoe_jax.checkpoint import CheckpointError, convert_checkpoint  # noqa: PLC0415
    bars = []

    def progress(layers):
        if args.quiet:
            yield from layers
            return
        bars.append(tqdm(total=len(layers), desc=f"convert {args.arch}", unit="layer", file=sys.stderr))
        for layer in layers:
            yield layer
            bars[-1].update()
        bars[-1].close()
    try:
        merge = MergeConfig(similarity_threshold=args.similarity_threshold, pairing=args.pairing,
                            pairing_sample=args.pairing_sample, strict=args.strict, method=args.method,
                            align_neurons=args.align_neurons, saliency=args.saliency)
        calibration = None
        if args.method in ("frequency", "drop") or args.saliency == "activation":
            if not args.calibration_text:
                raise ValueError(f"--method {args.method} --saliency {args.saliency} needs --calibration-text FILE")
            from puzzlemoe_jax.calibrate import calibrate_checkpoint  # noqa: PLC0415
            calibration = calibrate_checkpoint(args.src, args.arch, args.calibration_text, dtype=args.dtype,
                                               seq_len=args.calibration_seq_len, max_windows=args.calibration_windows)
        rep = convert_checkpoint(args.src, args.out, args.arch, ratio=args.ratio, merge=merge, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=progress, calibration=calibration)
    except (CheckpointError, ValueError) as e:
        for bar in bars:  # clear the unfinished bar so the error is one clean line
            bar.leave = False
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary(rep))
    if args.verbose and not args.quiet:
        from puzzlemoe_jax import report  # noqa: PLC0415
        print(report.format_table(row for r in rep.layers if r.stats for row in report.pair_rows(r.stats, r.layer)))
    return 0
