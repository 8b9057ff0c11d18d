"""Converter CLI: Hugging Face safetensors MoE checkpoints -> PuzzleMoE Flax checkpoints.

    python -m convert ARCH --src HF_DIR --out OUT_DIR [--ratio 0.5]

Bad input exits with status 2 and one line ``error: ...`` naming the file/tensor at fault; no
output directory is left behind.  The work is done by ``puzzlemoe_jax.conversion.convert_checkpoint``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from puzzlemoe_jax import cli, compile_cache
from puzzlemoe_jax.config import CLI_ARCHS
from puzzlemoe_jax.hf_layout import READ_MODES
from puzzlemoe_jax.merge import METHODS, PAIRINGS, SALIENCIES, MergeConfig
from puzzlemoe_jax.report import format_table, pair_rows, summary
from puzzlemoe_jax.safetensors_io import CheckpointError

DESCRIPTIONS = {
    "mixtral": "Mixtral (mistralai/Mixtral-8x7B-v0.1, 8x22B)",
    "qwen2_moe": "Qwen1.5-MoE / Qwen2-MoE (shared expert with sigmoid gate)",
    "qwen3_moe": "Qwen3-MoE (q/k norms, no shared expert)",
    "deepseek": "DeepSeek-MoE 16B (trust_remote_code layout; config read without running remote code)",
    "olmoe": "OLMoE (allenai/OLMoE-1B-7B-0924: q/k norm over the projection, 64 experts top-8)",
    "glm4_moe": "GLM-4.5 / 4.6 (zai-org/GLM-4.5-Air: sigmoid grouped routing, shared expert, partial rotary)",
    "deepseek_v2": "DeepSeek-V2 / V2-Lite (MLA, YaRN, greedy or group-limited routing)",
    "deepseek_v3": "DeepSeek-V3 / R1 (MLA, YaRN, noaux_tc routing; FP8 block-scaled weights dequantized)",
    "kimi_k2": "Kimi-K2 (moonshotai/Kimi-K2-Instruct: the DeepSeek-V3 architecture under its own model_type)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert",
                                description="Convert a Hugging Face safetensors MoE checkpoint to a Flax "
                                            "checkpoint, optionally merging expert pairs (PuzzleMoE).")
    sub = p.add_subparsers(dest="arch", required=True, metavar="ARCH",
                           help=" | ".join(CLI_ARCHS))
    for arch in CLI_ARCHS:
        s = sub.add_parser(arch, help=DESCRIPTIONS[arch], description=DESCRIPTIONS[arch])
        s.add_argument("--src", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
        s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
        s.add_argument("--ratio", type=cli.ratio, default=0.0,
                       help="fraction of expert memory to save by merging pairs, 0..0.5 (0: no merging)")
        s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="dtype of the unpacked parameters (auto: the checkpoint's)")
        s.add_argument("--similarity-threshold", type=cli.unit_float, default=None,
                       help="share an element when | |a|-|b| | <= t * max(|a|,|b|) (default 2-sqrt(2); --similarity-rule sum: t*(|a|+|b|))")
        s.add_argument("--pairing", choices=PAIRINGS, default=None,
                       help="how experts are paired within a layer (default min_error): random (seeded), cosine "
                            "(weight similarity), coactivation (experts routed together; calibration)")
        s.add_argument("--seed", type=int, default=0, help="seed of --pairing random")
        s.add_argument("--coactivation-weight", type=cli.unit_float, default=1.0,
                       help="--pairing coactivation: 1 = pure coactivation, <1 blends in the merge error")
        s.add_argument("--similarity-rule", choices=["max", "sum"], default=None,
                       help="max: | |a|-|b| | <= t*max(|a|,|b|) (default); sum: <= t*(|a|+|b|) (the paper's)")
        s.add_argument("--preset", choices=["paper"], default=None,
                       help="paper: the paper's settings (sum rule, t=0.4, wanda saliency, random pairing with "
                            "--seed); explicit flags override")
        s.add_argument("--pairing-sample", type=cli.positive_int, default=MergeConfig.pairing_sample,
                       help="elements per matrix used to estimate pair costs")
        s.add_argument("--method", choices=METHODS, default="puzzle",
                       help="puzzle (dual-mask merge, default) or a baseline: average (uniform merge), "
                            "frequency (routing-frequency-weighted merge), drop (remove the least-routed experts), "
                            "reap, naee (expert pruning), hc-smoe (clustering merge), wanda-2:4 (2:4 weight "
                            "pruning, stored dense); all but puzzle/average need --calibration-text")
        s.add_argument("--align-neurons", action="store_true",
                       help="permute each pair's second expert's neurons to match the first before merging")
        s.add_argument("--saliency", choices=SALIENCIES, default=None,
                       help="who wins elements the two experts disagree on: |W|^2 (magnitude, default), "
                            "|W|^2 * E[x^2] (activation) or |W| * ||X||_2 (wanda, the paper's); the last two need "
                            "calibration")
        s.add_argument("--calibration-text", metavar="FILE",
                       help="text for routing frequencies / input statistics (needed by --method frequency|drop "
                            "and --saliency activation; loads the whole dense model)")
        s.add_argument("--calibration-windows", type=cli.positive_int, default=32, help="windows of calibration text")
        s.add_argument("--calibration-seq-len", type=cli.positive_int, default=256, help="tokens per calibration window")
        s.add_argument("--strict", action="store_true",
                       help="fail if a merged magnitude does not fit the 5-bit exponent")
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
        s.add_argument("--sequential", action="store_true",
                       help="one thread, host-only reading and merging (slower; for comparisons)")
        s.add_argument("--read-threads", type=cli.positive_int, default=8,
                       help="concurrent expert-tensor reads (storage tuning; default 8)")
        s.add_argument("--read-mode", choices=READ_MODES, default="map",
                       help="how expert tensors reach an accelerator: copied from the mapped file (map, "
                            "default), read into one reused buffer per thread (reuse) or a new one (fresh)")
        compile_cache.add_argument(s)
        s.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
        s.add_argument("--verbose", action="store_true",
                       help="also print the per-pair statistics (similar, salient, kept, error, clamps)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    # jax reserves 75 % of the GPU up front, and the process then holds host memory in proportion to
    # the reservation (3.3 GiB of RSS on an H200: benchmarks/RESULTS.md); the converter needs a few
    # layers of device memory, so it grows its pool on demand unless the user set this
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # heavy imports after argument parsing, so --help is fast
    from tqdm import tqdm  # noqa: PLC0415

    from puzzlemoe_jax.conversion import convert_checkpoint  # noqa: PLC0415
    compile_cache.enable(args.compile_cache)   # a second conversion of the same shapes skips the merge's compile
    bars = []

    def progress(steps):
        """Bar over the input bytes (rate in GB/s, time left), the layer count as a postfix."""
        if args.quiet:
            yield from steps
            return
        bar = tqdm(total=sum(n for _, n in steps), desc=f"convert {args.arch}", unit="B", unit_scale=True,
                   unit_divisor=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                   "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        bars.append(bar)
        layers = sum(1 for layer, _ in steps if layer is not None)
        for k, (layer, n) in enumerate(steps):
            yield layer, n
            bar.set_postfix_str(f"layer {min(k + 1, layers)}/{layers}", refresh=False)
            bar.update(n)
        bar.close()
    try:
        cli.check_path(args.src, "dir", "--src")
        cli.check_path(args.out, "outdir", "--out")
        cli.check_out_vs_src(args.src, args.out)
        if args.calibration_text:
            cli.check_path(args.calibration_text, "file", "--calibration-text")
        base = MergeConfig.paper() if args.preset == "paper" else MergeConfig()
        given = {k: v for k, v in dict(similarity_threshold=args.similarity_threshold, pairing=args.pairing,
                                       saliency=args.saliency, similarity_rule=args.similarity_rule).items()
                 if v is not None}
        merge = dataclasses.replace(base, **given, pairing_sample=args.pairing_sample, strict=args.strict,
                                    method=args.method, align_neurons=args.align_neurons, seed=args.seed,
                                    coactivation_weight=args.coactivation_weight)
        calibration = None
        if merge.needs_calibration:
            if not args.calibration_text:
                raise ValueError(f"--method {merge.method} --saliency {merge.saliency} --pairing {merge.pairing} "
                                 "needs --calibration-text FILE")
            from puzzlemoe_jax.calibrate import calibrate_checkpoint  # noqa: PLC0415
            calibration = calibrate_checkpoint(args.src, args.arch, args.calibration_text, dtype=args.dtype,
                                               seq_len=args.calibration_seq_len, max_windows=args.calibration_windows)
        rep = convert_checkpoint(args.src, args.out, args.arch, ratio=args.ratio, merge=merge, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=progress, calibration=calibration,
                                 pipeline=not args.sequential, read_threads=args.read_threads,
                                 read_mode=args.read_mode)
    except (CheckpointError, ValueError) as e:
        for bar in bars:  # clear the unfinished bar so the error is one clean line
            bar.leave = False
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        import resource  # noqa: PLC0415
        print(summary(rep))
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if args.verbose and not args.quiet:
        print(format_table(row for r in rep.layers if r.stats for row in pair_rows(r.stats, r.layer)))
    return 0
