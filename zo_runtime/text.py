"""Prompt -> conditioning through the embedding-input text encoder(s), with learned rows spliced in.

SD 1.x/2.x: one TextEncoder. SDXL: `SdxlTextEncoder` runs both encoders and presents one learned vector per
token of width d1 + d2, laid out [clip_l | clip_g] (768 + 1280 on SDXL base), the layout of the learned-embeds
file's clip_l / clip_g tensors (zo_runtime/embeds.py).
"""
from __future__ import annotations

import numpy as np

from .model_dir import INPUTS, ModelDir
from .session import OnnxModel
from .tokenizer import ClipTokenizer


class TextEncoder:
    """Tokenizer + memory-mapped token table + text-encoder session; learned tokens get ids >= vocab."""

    def __init__(self, model: ModelDir, provider: str = "cpu", provider_options: dict | None = None,
                 sub: str = "text_encoder", session: OnnxModel | None = None):
        """sub: which text encoder (SDXL has text_encoder_2); session: it already open (objective.Sessions)."""
        m = model.manifest
        folder, pad = model.tokenizer_of(sub)
        self.tokenizer = ClipTokenizer(folder, pad_token=pad, max_length=int(m["max_length"]))
        self.table = model.token_table(sub)           # (V, d) mmap, never copied
        self.session = session or OnnxModel(model.onnx(sub), provider, provider_options, expect=INPUTS[sub])
        self.dim = self.table.shape[1]
        self.learned: dict[int, np.ndarray] = {}      # id -> (d,) float32
        # SDXL's text_encoder_2 also returns the pooled projection, at a position the runtime supplies.
        self.pooled = "pool_index" in self.session.inputs
        self.pool_rule = (m["pool_rule"], int(m["eos_token_id_2"])) if self.pooled else None

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

    def prompt_rows(self, prompt: str) -> tuple[np.ndarray, np.ndarray, None]:
        """((77,) ids, (77, d) token rows, None) of a prompt: what training splices its vectors into."""
        ids = self.tokenizer([prompt])[0]
        return ids, self.token_embeds(ids[None])[0], None

    def conditioning(self, embeds: np.ndarray, extra: dict, rows: int) -> dict[str, np.ndarray]:
        """(P, 77, d) token rows -> the UNet's text inputs {encoder_hidden_states: (P, 77, d)}, `rows` per call."""
        return {"encoder_hidden_states": np.concatenate([self.encode_embeds(embeds[i:i + rows])
                                                         for i in range(0, len(embeds), rows)])}

    def encode_embeds(self, embeds: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """(B, 77, d) token embeddings -> (B, 77, d) last_hidden_state (what the UNet conditions on).

        A pooled encoder (SDXL's second) also needs the (B, 77) ids its pooling position comes from.
        """
        return self.run(embeds, ids)[0]

    def run(self, embeds: np.ndarray, ids: np.ndarray | None = None) -> list[np.ndarray]:
        """All outputs: [last_hidden_state (B, 77, d)] or, pooled, [last_hidden_state, text_embeds (B, p)]."""
        feeds = {"inputs_embeds": embeds}
        if self.pooled:
            if ids is None:
                raise ValueError("this text encoder pools at a token position: pass the token ids too")
            feeds["pool_index"] = pool_index(ids, *self.pool_rule)
        return self.session.run(feeds)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.encode_embeds(self.token_embeds(self.tokenizer(prompts)))


def pool_index(ids: np.ndarray, rule: str, eos_id: int) -> np.ndarray:
    """(B, 77) ids -> (B,) int64 position transformers' CLIPTextTransformer pools at.

    "argmax" (configs with eos_token_id 2, SDXL base's): the first position of the largest id, i.e. the EOS, or a
    learned token (ids >= vocab) when the prompt has one, as in diffusers. "first_eos": the first eos_id.
    """
    ids = np.asarray(ids)
    if rule == "argmax":
        return ids.argmax(axis=1).astype(np.int64)
    if rule == "first_eos":
        return (ids == eos_id).argmax(axis=1).astype(np.int64)
    raise ValueError(f"pool rule {rule!r} is unknown (argmax, first_eos): re-export the model")


class SdxlTextEncoder:
    """SDXL's two encoders as one: learned vectors (k, d1 + d2) = [clip_l | clip_g]; prompts -> (hidden, pooled).

    Token ids agree between the two tokenizers for the vocabulary and for placeholders (same BPE, tokens added in
    the same order); only the padding differs (<|endoftext|> vs "!"), so each encoder tokenizes for itself.
    """

    def __init__(self, model: ModelDir, provider: str = "cpu", provider_options: dict | None = None):
        if not model.is_xl:
            raise ValueError(f"{model.root} is {model.family}, not SDXL: use TextEncoder")
        self.encoders = tuple(TextEncoder(model, provider, provider_options, sub) for sub in model.text_encoders)
        self.dims = tuple(e.dim for e in self.encoders)     # (d1, d2)
        self.dim = sum(self.dims)
        self.tokenizer = self.encoders[0].tokenizer         # for token lookups; ids agree in both

    def split(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, d1 + d2) -> (k, d1) clip_l rows, (k, d2) clip_g rows."""
        vectors = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        return vectors[:, :self.dims[0]], vectors[:, self.dims[0]:]

    def add_tokens(self, tokens: list[str], vectors: np.ndarray) -> list[int]:
        """Add placeholders to both encoders with their (k, d1 + d2) vectors; returns their (shared) ids."""
        ids = [enc.add_tokens(tokens, part) for enc, part in zip(self.encoders, self.split(vectors))]
        if ids[0] != ids[1]:
            raise RuntimeError(f"placeholder ids differ between the tokenizers ({ids}): their vocabularies differ")
        return ids[0]

    def set_vectors(self, ids: list[int], vectors: np.ndarray) -> None:
        for enc, part in zip(self.encoders, self.split(vectors)):
            enc.set_vectors(ids, part)

    @property
    def table(self) -> "_Joined":
        """The two token tables side by side: table[i] is a (d1 + d2,) [clip_l | clip_g] row (an init vector)."""
        return _Joined(self.encoders[0].table, self.encoders[1].table)

    @property
    def session(self):
        return self.encoders[0].session          # its batch axis is the pair's (exported alike)

    def prompt_rows(self, prompt: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """((77,) ids, (77, d1 + d2) token rows of both encoders side by side, {"ids_2": encoder 2's (77,) ids})."""
        ids_1, ids_2 = (enc.tokenizer([prompt])[0] for enc in self.encoders)
        rows = np.concatenate([enc.token_embeds(i[None])[0] for enc, i in zip(self.encoders, (ids_1, ids_2))], -1)
        return ids_1, rows, {"ids_2": ids_2}

    def conditioning(self, embeds: np.ndarray, extra: dict, rows: int) -> dict[str, np.ndarray]:
        """(P, 77, d1 + d2) token rows -> {encoder_hidden_states (P, 77, d1 + d2), text_embeds (P, p)}: both
        encoders, pooled where encoder 2 pools for these ids (a placeholder's position under SDXL's argmax)."""
        d1 = self.dims[0]
        ids_2 = np.repeat(extra["ids_2"][None], len(embeds), axis=0)
        hidden, pooled = self.encode_embeds((embeds[..., :d1], embeds[..., d1:]), ids_2, rows)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(B, 77) ids for each encoder (they differ only in padding)."""
        return tuple(enc.tokenizer(prompts) for enc in self.encoders)

    def encode_embeds(self, embeds: tuple[np.ndarray, np.ndarray], ids_2: np.ndarray,
                      rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """((B, 77, d1), (B, 77, d2)) token embeddings -> hidden (B, 77, d1 + d2), pooled (B, p).

        rows: encoder batch per call (a static-batch model's); the last chunk is padded and trimmed.
        """
        B = len(ids_2)
        rows = rows or B
        hidden, pooled = [], []
        for a in range(0, B, rows):
            e1, e2, i2 = (_pad_rows(x[a:a + rows], rows) for x in (embeds[0], embeds[1], ids_2))
            h1 = self.encoders[0].run(e1)[0]
            h2, p = self.encoders[1].run(e2, i2)
            n = min(rows, B - a)
            hidden.append(np.concatenate([h1, h2], axis=-1)[:n])
            pooled.append(p[:n])
        return np.concatenate(hidden), np.concatenate(pooled)

    def __call__(self, prompts: list[str], rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> hidden (B, 77, d1 + d2), pooled (B, p): what SDXL's UNet conditions on."""
        ids = self.tokenize(prompts)
        embeds = tuple(enc.token_embeds(i) for enc, i in zip(self.encoders, ids))
        return self.encode_embeds(embeds, ids[1], rows)


class _Joined:
    """Two (V, d1), (V, d2) token tables read as one (V, d1 + d2) table (rows copied on read)."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.a, self.b = a, b
        self.shape = (a.shape[0], a.shape[1] + b.shape[1])

    def __getitem__(self, ids) -> np.ndarray:
        return np.concatenate([np.asarray(self.a[ids], np.float32), np.asarray(self.b[ids], np.float32)], axis=-1)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x with its last row repeated up to `rows` rows (static-batch models need full batches)."""
    return x if len(x) == rows else np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])
