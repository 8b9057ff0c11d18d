"""Start reading a checkpoint's first layers into the page cache while the converter starts.

``python -m convert`` spends its first seconds importing jax and starting the device, with the disk
idle; the converter then reads the first layers.  ``prefetch_first_layers`` asks the kernel to read
those layers' bytes ahead (``posix_fadvise(WILLNEED)``, on a daemon thread) before the imports, so
the first reads find them in the page cache.  Standard library only: it runs before jax is imported.
Best effort: anything it cannot read is left to the converter, which reports bad input itself.
"""
from __future__ import annotations

import json
import os
import re
import struct
import threading
from pathlib import Path

LAYER = re.compile(r"\.layers\.(\d+)\.")


def _spans(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor: (first byte, end)} of a safetensors file, from its header."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return {k: (8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def plan(src: Path, budget: int) -> list[tuple[Path, int, int]]:
    """(file, start, end) of the tensors to read ahead: layer by layer from layer 0 (tensors outside
    the layers last), in file order within a layer, up to ``budget`` bytes."""
    order = []
    for path in sorted(Path(src).glob("*.safetensors")):
        for name, (a, b) in _spans(path).items():
            m = LAYER.search(name)
            order.append((int(m.group(1)) if m else 1 << 30, str(path), a, b))
    out, left = [], budget
    for _, path, a, b in sorted(order):
        if left < b - a:
            break
        out.append((Path(path), a, b))
        left -= b - a
    return out


def default_budget() -> int:
    """A quarter of the memory available now, at most 4 GiB."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
    return min(4 << 30, available // 4)


def prefetch_first_layers(src, budget: int | None = None) -> threading.Thread | None:
    """Read ahead the first layers of the checkpoint in ``src`` on a daemon thread (None where the
    platform has no ``posix_fadvise``)."""
    if not hasattr(os, "posix_fadvise"):
        return None

    def run():
        fds: dict[Path, int] = {}
        try:
            for path, a, b in plan(Path(src), default_budget() if budget is None else budget):
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fds[path], a, b - a, os.POSIX_FADV_WILLNEED)
        except (OSError, ValueError, KeyError, struct.error):
            pass
        finally:
            for fd in fds.values():
                os.close(fd)

    thread = threading.Thread(target=run, name="prefetch", daemon=True)
    thread.start()
    return thread


def src_argument(argv: list[str]) -> str | None:
    """The value of ``--src`` in a command line, if any (before argparse, which needs the imports)."""
    for k, arg in enumerate(argv):
        if arg == "--src" and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith("--src="):
            return arg.split("=", 1)[1]
    return None
