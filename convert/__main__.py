"""``python -m convert <arch> --src HF_DIR --out OUT_DIR [--ratio R]``: HF safetensors -> PuzzleMoE Flax."""
from __future__ import annotations

import os
import sys

from puzzlemoe_jax import prefetch

if __name__ == "__main__":
    # the disk reads the first layers while jax is imported and the device starts
    src = prefetch.src_argument(sys.argv[1:])
    if src and os.path.isdir(src) and "--no-prefetch" not in sys.argv:
        prefetch.prefetch_first_layers(src)
    from convert import main
    sys.exit(main())
