"""Text <-> token ids for a converted model directory: byte-level or ``tokenizer.json``.

Byte-level models (vocabulary 256, like the embedded tiny models) encode UTF-8 bytes directly.
Other models need the ``tokenizer.json`` that ``python -m convert`` copies from the Hugging Face
checkpoint, read with the ``tokenizers`` package (installed with transformers).
"""
from __future__ import annotations

from pathlib import Path

BYTE_VOCAB = 256


class TextCodec:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` for the model in ``model_dir``."""

    def __init__(self, model_dir, vocab_size: int):
        self.tokenizer = None
        path = Path(model_dir) / "tokenizer.json"
        if vocab_size != BYTE_VOCAB:
            if not path.exists():
                raise ValueError(f"{model_dir}: vocabulary of {vocab_size} is not byte-level and there is no "
                                 "tokenizer.json; pass token ids instead")
            try:
                from tokenizers import Tokenizer  # noqa: PLC0415 (only for non-byte models)
            except ImportError as e:
                raise ValueError(f"{path}: reading it needs the 'tokenizers' package (pip install tokenizers)") from e
            self.tokenizer = Tokenizer.from_file(str(path))

    @property
    def byte_level(self) -> bool:
        return self.tokenizer is None

    def encode(self, text: str) -> list[int]:
        if self.byte_level:
            return list(text.encode("utf-8"))
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        if self.byte_level:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode([int(i) for i in ids])
