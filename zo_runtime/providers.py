"""Execution-provider names, availability and `auto` choice (one place for all stages)."""
from __future__ import annotations

import onnxruntime as ort

# Short CLI name -> onnxruntime execution provider.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
# Package that brings each provider (named in errors so the fix is one command away).
PACKAGES = {
    "cuda": "onnxruntime-gpu",
    "dml": "onnxruntime-directml",
    "openvino": "onnxruntime-openvino",
    "qnn": "onnxruntime-qnn",
    "coreml": "onnxruntime (macOS build)",
    "cpu": "onnxruntime",
}
# `auto` prefers accelerators; NPUs first since that is what the project targets.
AUTO_ORDER = ("qnn", "cuda", "coreml", "dml", "openvino", "cpu")
# Defaults that make each provider run a model without extra flags.
# OpenVINO's CPU plugin quantizes activations on the fly (dynamic quantization) for layers with INT8 weights:
# outputs stay within 3e-3, but the ZO finite differences decorrelate (corr -0.26 vs 0.99997 with it off,
# tiny w8 model, mu 1e-3), so zoodip turns it off (tests/test_openvino.py).
DEFAULT_OPTIONS = {
    "openvino": {"device_type": "CPU", "load_config": '{"CPU": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}}'},
    "qnn": {"backend_path": "QnnHtp.dll"},
}


def available() -> list[str]:
    """Short names of the providers this onnxruntime build offers, in AUTO_ORDER."""
    have = set(ort.get_available_providers())
    return [name for name in AUTO_ORDER if PROVIDERS[name] in have]


def resolve(name: str) -> str:
    """Short name (or `auto`) -> a short name that this onnxruntime can run; ValueError names the fix."""
    name = name.lower()
    if name == "auto":
        return available()[0]
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}: choose one of auto, {', '.join(PROVIDERS)}")
    if name not in available():
        raise ValueError(
            f"provider {name!r} is not in this onnxruntime build (have: {', '.join(available())}); "
            f"install {PACKAGES[name]} in its own environment (it replaces the onnxruntime package)")
    return name


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """['k=v', ...] from --provider-option into a dict; ValueError on a malformed pair."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"provider option {pair!r} must look like key=value")
        out[key] = value
    return out


def session_providers(name: str, options: dict[str, str] | None = None) -> list:
    """The `providers=` list for InferenceSession: chosen provider with options, CPU as fallback."""
    short = resolve(name)
    opts = {**DEFAULT_OPTIONS.get(short, {}), **(options or {})}
    chosen = (PROVIDERS[short], opts) if opts else PROVIDERS[short]
    return [chosen] if short == "cpu" else [chosen, "CPUExecutionProvider"]
