"""Files the product ships (see README.md here): the CLIP BPE tokenizer and DreamBooth's prompt lists."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
CLIP_BPE = ASSETS / "clip-bpe"                                        # vocab.json + merges.txt
DREAMBOOTH_PROMPTS = ASSETS / "dreambooth" / "prompts_and_classes.txt"
