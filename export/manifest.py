"""manifest.json for an exported folder: the model facts the runtime needs, versions, and a sha256 per file."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from zo_runtime.model_dir import FORMAT, MANIFEST_KEYS, file_hashes, sha256, verify_files  # noqa: F401 (re-exported)

# Distributions whose versions shape the exported graphs (recorded so a bad export can be traced).
VERSIONED = ("torch", "optimum", "optimum-onnx", "onnx", "onnxruntime", "diffusers", "transformers")


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def build_manifest(root: Path, facts: dict, opset: int) -> dict:
    """facts: the model keys of MANIFEST_KEYS (family, dims, schedule, ...); adds format, opset, scheme, versions, files."""
    manifest = dict(facts, format=FORMAT, opset=opset, scheme="fp32", versions=versions(), files=file_hashes(root))
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise RuntimeError(f"manifest lacks {missing}: export bug")
    return manifest
