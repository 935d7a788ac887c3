"""The torch-free CLIP tokenizer matches transformers' CLIPTokenizer id for id."""

import numpy as np
import pytest

from zo_runtime.assets import CLIP_BPE
from zo_runtime.tokenizer import ClipTokenizer

BPE = CLIP_BPE
PROMPTS = ["a photo of a dog", "A  Photo of, dogs! 123 café", "a red striped star on a blue background",
           "it's the dog's toy -- 3.5 times", "word " * 90]


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer(BPE)


def test_sd1_ids(ours):
    assert ours("a photo of a dog")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 49407, 49407]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_matches_transformers(ours, pad):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer(str(BPE / "vocab.json"), str(BPE / "merges.txt"), pad_token=pad)
    tok = ours if pad == "<|endoftext|>" else ClipTokenizer(BPE, pad_token=pad)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(tok(PROMPTS), np.array(want))


def test_placeholder_is_one_new_token():
    tok = ClipTokenizer(BPE)
    (sks,) = tok.add_tokens(["sks"])
    assert sks == 49408 and tok.vocab_size == 49409
    ids = tok("a photo of sks, dog")[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, sks, 267, 1929]
