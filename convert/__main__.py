"""``python -m convert <arch> --src HF_DIR --out OUT_DIR [--ratio R]``: HF safetensors -> PuzzleMoE Flax."""
from __future__ import annotations

import sys

from convert import main

if __name__ == "__main__":
    sys.exit(main())
