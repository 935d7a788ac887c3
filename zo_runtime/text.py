"""Prompt -> conditioning through the embedding-input text encoder, with learned rows spliced in."""
from __future__ import annotations

import numpy as np

from .model_dir import ModelDir
from .session import OnnxModel
from .tokenizer import ClipTokenizer


class TextEncoder:
    """Tokenizer + memory-mapped token table + text-encoder session; learned tokens get ids >= vocab."""

    def __init__(self, model: ModelDir, provider: str = "cpu", provider_options: dict | None = None,
                 session: OnnxModel | None = None):
        """session: the text encoder already open (objective.Sessions), else it is opened here."""
        m = model.manifest
        self.tokenizer = ClipTokenizer(model.tokenizer_dir, pad_token=m["pad_token"], max_length=int(m["max_length"]))
        self.table = model.token_table()              # (V, d) mmap, never copied
        self.session = session or OnnxModel(model.onnx("text_encoder"), provider, provider_options)
        self.dim = self.table.shape[1]
        self.learned: dict[int, np.ndarray] = {}      # id -> (d,) float32

    def add_tokens(self, tokens: list[str], vectors: np.ndarray) -> list[int]:
        """Register placeholder tokens with their (k, d) vectors; ValueError if one already exists."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(tokens), self.dim):
            raise ValueError(f"{len(tokens)} tokens need vectors of shape ({len(tokens)}, {self.dim}), got {vectors.shape}")
        for t in tokens:
            if self.tokenizer.token_id(t) is not None:
                raise ValueError(f"token {t!r} is already in the vocabulary; pick a new placeholder such as 'sks'")
        ids = self.tokenizer.add_tokens(tokens)
        self.learned.update({i: v for i, v in zip(ids, vectors)})
        return ids

    def set_vectors(self, ids: list[int], vectors: np.ndarray) -> None:
        """Overwrite the (k, d) vectors of already-added placeholder ids (e.g. a moving embedding)."""
        unknown = [i for i in ids if i not in self.learned]
        if unknown:
            raise ValueError(f"ids {unknown} are not added placeholder tokens; call add_tokens first")
        self.learned.update({i: np.asarray(v, np.float32) for i, v in zip(ids, vectors)})

    def token_embeds(self, ids: np.ndarray) -> np.ndarray:
        """(B, 77) ids -> (B, 77, d) float32 rows; learned ids take their registered vectors."""
        V = self.table.shape[0]
        out = np.asarray(self.table[np.minimum(ids, V - 1)], dtype=np.float32)
        for i, vec in self.learned.items():
            out[ids == i] = vec
        return out

    def encode_embeds(self, embeds: np.ndarray) -> np.ndarray:
        """(B, 77, d) token embeddings -> (B, 77, d) last_hidden_state (what the UNet conditions on)."""
        return self.session.run({"inputs_embeds": embeds})[0]

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.encode_embeds(self.token_embeds(self.tokenizer(prompts)))
