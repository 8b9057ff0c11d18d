"""Argument checks shared by the CLIs: argparse types for numeric flags, path-kind checks.

Numeric types raise ``argparse.ArgumentTypeError`` (argparse prints its usage error, exit 2);
``check_path`` raises ``InputError`` (the CLIs print one ``error:`` line, exit 2).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


class InputError(ValueError):
    """A path of the wrong kind, or an --out that would clobber --src."""


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def probability(text: str) -> float:
    """A value in (0, 1] (nucleus top-p)."""
    v = _float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def ratio(text: str) -> float:
    """A compression ratio in [0, 0.5] (pairwise merging saves at most half)."""
    v = _float(text)
    if not 0 <= v <= 0.5:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.5] (pairwise merging saves at most half), got {v}")
    return v


def unit_float(text: str) -> float:
    """A value in [0, 1]."""
    v = _float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def check_path(path, kind: str, flag: str) -> Path:
    """``kind``: "dir" (an existing directory), "file" (an existing file), "out" (a file path that is
    not a directory), "outdir" (not an existing file)."""
    p = Path(path)
    if kind == "dir" and not p.is_dir():
        raise InputError(f"{flag} {p}: {'not a directory' if p.exists() else 'no such directory'}")
    if kind == "file" and not p.is_file():
        raise InputError(f"{flag} {p}: {'is a directory, expected a file' if p.is_dir() else 'no such file'}")
    if kind == "out" and p.is_dir():
        raise InputError(f"{flag} {p}: is a directory, expected a file path")
    if kind == "outdir" and p.exists() and not p.is_dir():
        raise InputError(f"{flag} {p}: exists and is not a directory")
    return p


def check_out_vs_src(src, out) -> None:
    """Refuse an output directory equal to, inside, or containing the source (symlinks resolved):
    ``--overwrite`` would otherwise delete the source checkpoint."""
    s, o = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if o == s or s in o.parents or o in s.parents:
        raise InputError(f"--out {out} overlaps --src {src} (equal, inside, or containing it); "
                         f"choose an output directory outside the source")
