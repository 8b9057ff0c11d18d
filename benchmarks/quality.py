"""Held-out quality of PuzzleMoE vs published baselines on the three embedded trained tiny MoE models.

    python benchmarks/quality.py [--ratios 0.5 0.25] [--models scratch upcycled finegrained] [--seeds 5]
                                 [--json benchmarks/quality_results.json]
    python benchmarks/quality.py --table-only

Models (models/): tiny-moe-scratch and tiny-moe-upcycled (Mixtral, 8 experts top-2), and
tiny-moe-finegrained (Qwen2-MoE, 32 experts top-4 + a shared expert).  For each ratio (25 % / 50 %
of the routed-expert count removed) and method: convert the checkpoint (timed), load it, score the
whole data/heldout.txt (553 windows of 512 bytes, each scored alone: bits/byte and next-byte top-1
accuracy).  Calibration statistics come from data/calibration.txt (the first 64 KiB of the
training text; held-out files are whole files never in training), computed once per model (timed
separately).  Rows with random pairing (the paper's settings) are run with seeds 0..S-1 and reported
as mean +- std.  For every pairing, "matrices/token" is the mean number of distinct weight matrices
(a packed pair or an unpaired expert, each the bytes of one bf16 expert) a token's top-k experts
read at batch 1, measured with the original model's routing on calibration and held-out text.
Rows are written to the JSON file as they finish.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from puzzlemoe_jax import evaluate  # noqa: E402
from puzzlemoe_jax.calibrate import calibrate_checkpoint, routed_inputs  # noqa: E402
from puzzlemoe_jax.checkpoint import load_pretrained  # noqa: E402
from puzzlemoe_jax.conversion import convert_checkpoint  # noqa: E402
from puzzlemoe_jax.merge import MergeConfig  # noqa: E402
from puzzlemoe_jax.pairing import pair_share  # noqa: E402

MODELS = {"scratch": ("from scratch", ROOT / "models/tiny-moe-scratch", "mixtral"),
          "upcycled": ("upcycled", ROOT / "models/tiny-moe-upcycled", "mixtral"),
          "finegrained": ("fine-grained", ROOT / "models/tiny-moe-finegrained", "qwen2_moe")}
SEQ = 512


def runs(ratio: float, seeds: int):
    """(label, [MergeConfig, ...]) for one ratio; several configs = seeds of a random-pairing row."""
    rows = [("PuzzleMoE default", [MergeConfig()]),
            ("PuzzleMoE paper settings", [MergeConfig.paper(seed=s) for s in range(seeds)]),
            ("PuzzleMoE cosine pairing", [MergeConfig(pairing="cosine")]),
            ("PuzzleMoE coactivation pairing", [MergeConfig(pairing="coactivation")]),
            ("PuzzleMoE coactivation 0.5 + merge error", [MergeConfig(pairing="coactivation", coactivation_weight=0.5)]),
            ("reap", [MergeConfig(method="reap")]), ("naee", [MergeConfig(method="naee")]),
            ("hc-smoe", [MergeConfig(method="hc-smoe")])]
    if ratio == 0.5:
        rows.append(("wanda-2:4 (50 % of weights zero, stored dense)", [MergeConfig(method="wanda-2:4")]))
    rows += [(m, [MergeConfig(method=m)]) for m in ("average", "frequency", "drop")]
    return rows


def routing_ids(model, tokens, max_windows=None, batch=16):
    """{layer: top-k ids [T, k]} of the (dense) model on windows of ``tokens``."""
    w = evaluate.windows(tokens, SEQ, max_windows)
    layers = model.moe_layers()
    for m in layers.values():
        m.capture = True
    out = {i: [] for i in layers}
    try:
        for s in range(0, len(w), batch):
            r = routed_inputs(model, jnp.asarray(w[s:s + batch]))
            for i in layers:
                out[i].append(np.asarray(r[i][1]))
    finally:
        for m in layers.values():
            m.capture = False
    return {i: np.concatenate(v) for i, v in out.items()}


def share(ids_by_layer, pairs_by_layer, e):
    got = [pair_share(ids_by_layer[i], pairs_by_layer.get(i, np.zeros((0, 2))), e) for i in ids_by_layer]
    return {"matrices_per_token": float(np.mean([g["matrices_per_token"] for g in got])),
            "shared_fraction": float(np.mean([g["shared_fraction"] for g in got]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--max-windows", type=int, default=None, help="default: the whole held-out file")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/quality_results.json"))
    ap.add_argument("--table-only", action="store_true", help="print the table of an existing --json, run nothing")
    args = ap.parse_args(argv)
    if args.table_only:
        return print_table(json.loads(Path(args.json).read_text()))
    heldout = np.frombuffer((ROOT / "data/heldout.txt").read_bytes(), np.uint8).astype(np.int32)
    calib = np.frombuffer((ROOT / "data/calibration.txt").read_bytes(), np.uint8).astype(np.int32)
    out = {"results": [], "models": {}}
    setup = {}
    for ratio in args.ratios:
        for key in args.models:
            name, src, arch = MODELS[key]
            if key not in setup:   # original model, calibration statistics, routing on both texts
                t0 = time.perf_counter()
                cal = calibrate_checkpoint(src, arch, ROOT / "data/calibration.txt")
                cal_s = time.perf_counter() - t0
                with tempfile.TemporaryDirectory() as tmp:
                    convert_checkpoint(src, Path(tmp) / "m", arch)
                    dense = load_pretrained(Path(tmp) / "m", impl="reference")
                    base = evaluate.evaluate(dense, heldout, SEQ, max_windows=args.max_windows, batch_size=16,
                                             bytes_per_token=1.0)
                    ids = {"calibration": routing_ids(dense, calib), "heldout": routing_ids(dense, heldout)}
                    e, k = dense.config.num_experts, dense.config.top_k
                setup[key] = (cal, base, ids, e)
                out["models"][name] = {"path": str(src.relative_to(ROOT)), "arch": arch, "experts": e, "top_k": k,
                                       "calibration_seconds": cal_s, "bits_per_byte": base["bits_per_byte"],
                                       "top1_accuracy": base["top1_accuracy"], "tokens": base["tokens"]}
                print(f"{name}: original {base['bits_per_byte']:.4f} bits/byte, top-1 {base['top1_accuracy']:.4f}; "
                      f"calibration {cal_s:.1f} s", flush=True)
            cal, base, ids, e = setup[key]
            for label, cfgs in runs(ratio, args.seeds):
                per_seed = []
                for cfg in cfgs:
                    with tempfile.TemporaryDirectory() as tmp:
                        t0 = time.perf_counter()
                        rep = convert_checkpoint(src, Path(tmp) / "m", arch, ratio=ratio, merge=cfg,
                                                 calibration=cal if cfg.needs_calibration else None)
                        seconds = time.perf_counter() - t0
                        model = load_pretrained(Path(tmp) / "m", impl="reference")
                        r = evaluate.evaluate(model, heldout, SEQ, max_windows=args.max_windows, batch_size=16,
                                              bytes_per_token=1.0)
                    pairs = {x.layer: np.asarray(x.stats["pairs"]) for x in rep.layers if x.stats}
                    per_seed.append({"bits_per_byte": r["bits_per_byte"], "top1_accuracy": r["top1_accuracy"],
                                     "convert_seconds": seconds, "seed": cfg.seed,
                                     "expert_bytes_fraction": rep.expert_bytes_out / rep.expert_bytes_in,
                                     "pairing": {t: share(ids[t], pairs, e) for t in ids} if cfg.method == "puzzle"
                                     else None})
                bpb = np.array([s["bits_per_byte"] for s in per_seed])
                acc = np.array([s["top1_accuracy"] for s in per_seed])
                row = {"model": name, "method": label, "ratio": ratio, "seeds": len(per_seed),
                       "bits_per_byte": float(bpb.mean()), "bits_per_byte_std": float(bpb.std()) if len(bpb) > 1 else None,
                       "delta_bpb": float(bpb.mean() - base["bits_per_byte"]),
                       "top1_accuracy": float(acc.mean()), "top1_accuracy_std": float(acc.std()) if len(acc) > 1 else None,
                       "convert_seconds": float(np.mean([s["convert_seconds"] for s in per_seed])),
                       "needs_calibration": cfgs[0].needs_calibration,
                       "expert_bytes_fraction": per_seed[0]["expert_bytes_fraction"], "per_seed": per_seed,
                       "tokens": r["tokens"], "config": dataclasses.asdict(cfgs[0])}
                out["results"].append(row)
                Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
                print(f"{name:>12} | {label:<44} | {ratio:4.2f} | {row['bits_per_byte']:.4f} | "
                      f"{row['delta_bpb']:+.4f} | {row['top1_accuracy']:.4f} | {seconds:.1f} s", flush=True)
    print_table(out)


def _pm(mean, std, fmt):
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if std is not None else "")


def print_table(out):
    """Markdown tables: quality per model x ratio x method; pairing and batch-1 bytes per token."""
    print("| model | ratio | method | bits/byte | change | top-1 acc. | convert s | expert bytes stored |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in out["models"].items():
        print(f"| {name} | 0 % | original | {m['bits_per_byte']:.4f} | | {m['top1_accuracy']:.4f} | "
              f"(calibration {m['calibration_seconds']:.1f}) | 1.000 |")
    for r in sorted(out["results"], key=lambda r: (r["model"], -r["ratio"])):
        print(f"| {r['model']} | {int(r['ratio'] * 100)} % | {r['method']}{' (%d seeds)' % r['seeds'] if r['seeds'] > 1 else ''} "
              f"| {_pm(r['bits_per_byte'], r['bits_per_byte_std'], '.4f')} | {r['delta_bpb']:+.4f} | "
              f"{_pm(r['top1_accuracy'], r['top1_accuracy_std'], '.4f')} | {r['convert_seconds']:.1f} | "
              f"{r['expert_bytes_fraction']:.3f} |")
    print("\n| model | ratio | pairing | matrices/token calib. | held-out | shared-pair tokens held-out | "
          "vs default pairing |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(out["results"], key=lambda r: (r["model"], -r["ratio"])):
        if not r["per_seed"][0]["pairing"]:
            continue
        d = next((x for x in out["results"] if x["model"] == r["model"] and x["ratio"] == r["ratio"]
                  and x["method"] == "PuzzleMoE default"), None)
        mpt = lambda x, t: float(np.mean([s["pairing"][t]["matrices_per_token"] for s in x["per_seed"]]))
        rel = f"{mpt(r, 'heldout') / mpt(d, 'heldout') - 1:+.1%}" if d else ""
        print(f"| {r['model']} | {int(r['ratio'] * 100)} % | {r['method']} | {mpt(r, 'calibration'):.3f} | "
              f"{mpt(r, 'heldout'):.3f} | "
              f"{np.mean([s['pairing']['heldout']['shared_fraction'] for s in r['per_seed']]):.3f} | {rel} |")


if __name__ == "__main__":
    main()
