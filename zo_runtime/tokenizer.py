"""CLIP BPE tokenizer for SD 1.x/2.x built with `tokenizers` (no transformers, no torch)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Same split as transformers' CLIPConverter (and OpenAI's simple_tokenizer).
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    """Pads to max_length with `pad_token` (SD 1.x: <|endoftext|>, SD 2.x: "!")."""

    def __init__(self, folder: str | Path, pad_token: str = EOS, max_length: int = 77):
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: a CLIP tokenizer folder needs vocab.json and merges.txt")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = []
        for line in merges_file.read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#version"):
                a, b = line.split()
                merges.append((a, b))
        tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                                   fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        # Positional (sep, cls): tokenizers 0.23 renamed the keywords.
        tok.post_processor = processors.RobertaProcessing(
            (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False)
        tok.add_special_tokens([AddedToken(BOS), AddedToken(EOS)])
        self._tok = tok
        self.base_vocab_size = len(vocab)
        self.max_length = max_length
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.pad_id = vocab[pad_token]
        if pad_token != EOS:  # like transformers: SD 2.x's pad "!" is special, so "dogs!" -> ... 0 (not 256)
            tok.add_special_tokens([AddedToken(pad_token)])
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add placeholder tokens (single-word, never split); returns their new ids (>= base vocab)."""
        self._tok.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in tokens])
        return [self._tok.token_to_id(t) for t in tokens]

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        """Token ids (B, max_length) int64: BOS ... EOS then padding; over-long prompts are truncated."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        for i, enc in enumerate(self._tok.encode_batch(texts)):
            ids = enc.ids
            if len(ids) > self.max_length:
                ids = ids[: self.max_length - 1] + [self.eos_id]
            out[i, : len(ids)] = ids
        return out
