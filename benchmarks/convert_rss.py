"""Peak host memory of ``python -m convert`` on a checkpoint whose experts are >= 10x one layer's.

Writes a random bf16 Mixtral-layout checkpoint (``puzzlemoe_jax.random_checkpoint``; default 12 layers of
8 experts 1024 x 2816, about 138 MiB of experts per layer, 1.6 GiB in all), then runs the
converter under ``/usr/bin/time -v`` for each ratio and prints a markdown table of
"Maximum resident set size".  The bare import of the converter's modules is measured too, as the
fixed part of the peak.

    .venv/bin/python benchmarks/convert_rss.py [--dir /tmp/convert_rss] [--layers 12]
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``cmd`` from /usr/bin/time -v."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return kb / 1024, secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/convert_rss")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--ratios", default="0,0.5")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from puzzlemoe_jax.random_checkpoint import write_tiny_checkpoint  # noqa: PLC0415

    d = Path(args.dir)
    src = d / "src"
    sizes = dict(num_layers=args.layers, hidden_size=args.hidden, moe_intermediate_size=args.inter,
                 num_experts=args.experts, num_heads=8, num_kv_heads=2, vocab_size=32000, dtype="bfloat16")
    stamp = src / "sizes.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != sizes:
        shutil.rmtree(src, ignore_errors=True)
        write_tiny_checkpoint(src, "mixtral", max_shard_bytes=512 << 20, **sizes)
        stamp.write_text(json.dumps(sizes))
    layer_experts = 3 * args.experts * args.hidden * args.inter * 2
    files = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    py = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
    rows = []
    rss, secs = peak_rss([py, "-c", "import convert, puzzlemoe_jax.checkpoint, tqdm"])
    rows.append(("import only", "-", rss, secs))
    for r in args.ratios.split(","):
        cmd = [py, "-m", "convert", "mixtral", "--src", str(src), "--out", str(d / f"out{r}"), "--ratio", r,
               "--overwrite", "--quiet"]
        rss, secs = peak_rss(cmd)
        rows.append((f"--ratio {r}", " ".join([".venv/bin/python", *cmd[1:]]).replace(str(d), "$DIR"), rss, secs))
        shutil.rmtree(d / f"out{r}")
    mib = 2 ** 20
    print(f"{datetime.date.today()}: Mixtral layout, {args.layers} layers x {args.experts} experts "
          f"{args.hidden}x{args.inter} bf16; one layer's experts {layer_experts / mib:.0f} MiB, all experts "
          f"{args.layers * layer_experts / mib:.0f} MiB ({args.layers}x), checkpoint files {files / mib:.0f} MiB\n")
    print("| run | peak RSS (MiB) | peak RSS / one layer's experts | wall (s) |")
    print("| --- | ---: | ---: | ---: |")
    for name, _, rss, secs in rows:
        print(f"| {name} | {rss:.0f} | {rss * mib / layer_experts:.2f} | {secs:.1f} |")
    print("\ncommand: /usr/bin/time -v " + rows[1][1].replace(f"--ratio {args.ratios.split(',')[0]} ", "--ratio R ").replace("/out0 ", "/outR "))


if __name__ == "__main__":
    main()
