"""Build the byte-level train / held-out corpus for the tiny MoE models.

Source: the reST sources of the Python 3.11 documentation as shipped by
Debian 12 (bookworm) in the package ``python3.11-doc`` (files
``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``).

Get the package and build the corpus (deterministic given the .deb)::

    apt-get update && apt-get download python3.11-doc
    python benchmarks/prepare_corpus.py --deb python3.11-doc_3.11.2-6+deb12u9_all.deb

Split rule: all ``*.rst.txt`` files under ``_sources`` are sorted by their
relative path (byte order); a file whose 0-based index ``i`` satisfies
``i % HOLDOUT_EVERY == 0`` (HOLDOUT_EVERY = 30) goes WHOLE to the held-out
set, every other file goes to the training set. Each set is the
concatenation, in sorted order, of its files' raw bytes, each file followed by
one extra ``\\n`` (files are UTF-8; the models are byte-level, vocab 256).

Outputs:
  data/heldout.txt        held-out text (committed, ~280 KB)
  data/manifest.json      package, version, sha256 of both outputs, file lists
  carry/train.txt         training text (~11.7 MB, NOT committed; git-ignored)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

HOLDOUT_EVERY = 30
SOURCES = "usr/share/doc/python3.11/html/_sources"
REPO = Path(__file__).resolve().parents[1]


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True
    ).stdout.strip()


def collect(root: Path) -> list[str]:
    src = root / SOURCES
    files = [
        p.relative_to(src).as_posix()
        for p in src.rglob("*.rst.txt")
        if p.is_file() and not p.is_symlink()
    ]
    return sorted(files, key=lambda s: s.encode())


def build(root: Path, heldout_out: Path, train_out: Path):
    src = root / SOURCES
    files = collect(root)
    held, train = [], []
    for i, rel in enumerate(files):
        (held if i % HOLDOUT_EVERY == 0 else train).append(rel)

    def cat(names):
        return b"".join((src / n).read_bytes() + b"\n" for n in names)

    hb, tb = cat(held), cat(train)
    heldout_out.parent.mkdir(parents=True, exist_ok=True)
    train_out.parent.mkdir(parents=True, exist_ok=True)
    heldout_out.write_bytes(hb)
    train_out.write_bytes(tb)
    return files, held, train, hb, tb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path, required=True, help="python3.11-doc_*.deb (from `apt-get download`)")
    ap.add_argument("--heldout", type=Path, default=REPO / "data" / "heldout.txt")
    ap.add_argument("--train", type=Path, default=REPO / "carry" / "train.txt")
    ap.add_argument("--manifest", type=Path, default=REPO / "data" / "manifest.json")
    args = ap.parse_args()

    package, version = deb_field(args.deb, "Package"), deb_field(args.deb, "Version")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(args.deb), tmp], check=True)
        files, held, train, hb, tb = build(Path(tmp), args.heldout, args.train)

    manifest = {
        "package": package,
        "version": version,
        "deb_sha256": hashlib.sha256(args.deb.read_bytes()).hexdigest(),
        "source_dir": SOURCES,
        "glob": "**/*.rst.txt",
        "split_rule": f"sorted by relative path (byte order); index % {HOLDOUT_EVERY} == 0 -> held out (whole file)",
        "join": "concatenation of raw file bytes in sorted order, each followed by one b'\\n'",
        "n_files": len(files),
        "heldout": {"n_files": len(held), "bytes": len(hb), "sha256": hashlib.sha256(hb).hexdigest(), "files": held},
        "train": {"n_files": len(train), "bytes": len(tb), "sha256": hashlib.sha256(tb).hexdigest()},
    }
    args.manifest.parent.mkdir(parents=True, exist_ok=True)
    args.manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{package} {version}: {len(files)} files; held out {len(held)} files / {len(hb)} bytes -> {args.heldout}; "
          f"train {len(train)} files / {len(tb)} bytes -> {args.train}")


if __name__ == "__main__":
    main()
