"""Model files of a quantization: saving (with the 2 GB external-data switch), sizes, support files, memory."""
from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from zo_runtime.model_dir import MANIFEST, ModelDir

TWO_GB = 2 * 1024 ** 3 - 64 * 1024 ** 2   # protobuf's limit, with room for the graph itself


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save; models over 2 GB put their weights in model.onnx_data beside it (the export layout)."""
    big = sum(len(t.raw_data) for t in model.graph.initializer) > TWO_GB
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
              location="model.onnx_data")


def replace_with_float(src: Path, dst: Path) -> None:
    for f in dst.parent.iterdir():
        f.unlink()
    for f in src.parent.iterdir():
        if f.name.startswith("model.onnx"):
            shutil.copy2(f, dst.parent / f.name)


def graph_inputs(path: Path) -> list:
    """Graph inputs as onnxruntime reports them (name, type string, shape), read without loading weights."""
    from types import SimpleNamespace
    types = {onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.FLOAT16: "tensor(float16)",
             onnx.TensorProto.INT64: "tensor(int64)", onnx.TensorProto.INT32: "tensor(int32)"}
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return [SimpleNamespace(name=i.name, type=types.get(i.type.tensor_type.elem_type, "tensor(float)"),
                            shape=[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim])
            for i in graph.input if i.name not in inits]


def release_memory() -> None:
    """Hand freed heap back to the OS: after a 3.4 GB UNet proto, glibc otherwise keeps ~4 GB for the next stage."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc (macOS, Windows, musl): nothing to trim
        pass


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model.onnx"))


def copy_support_files(src: ModelDir, dst: Path) -> None:
    """Tokenizer, scheduler, token table and anything else that is not a submodel graph or its weights."""
    for f in sorted(src.root.rglob("*")):
        rel = f.relative_to(src.root)
        if not f.is_file() or f.name == MANIFEST or (rel.parts[0] in src.submodels and f.name.startswith("model.onnx")):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst / rel)
