"""manifest.json for an exported folder: the model facts the runtime needs, versions, and a sha256 per file."""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from zo_runtime.model_dir import FORMAT, MANIFEST, MANIFEST_KEYS

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


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under root except the manifest itself."""
    return {p.relative_to(root).as_posix(): sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def build_manifest(root: Path, facts: dict, opset: int) -> dict:
    """facts: the model keys of MANIFEST_KEYS (family, dims, schedule, ...); adds format, opset, scheme, versions, files."""
    manifest = dict(facts, format=FORMAT, opset=opset, scheme="fp32", versions=versions(), files=file_hashes(root))
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise RuntimeError(f"manifest lacks {missing}: export bug")
    return manifest


def verify_files(root: Path, manifest: dict) -> list[str]:
    """Relative paths whose sha256 no longer matches the manifest (or that are missing)."""
    bad = []
    for rel, digest in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file() or sha256(p) != digest:
            bad.append(rel)
    return bad
