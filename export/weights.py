"""Stream weights in and out of safetensors files one module at a time (peak memory: one block, not the model).

SDXL's UNet is 10.3 GB in fp32; building it eagerly and calling save_pretrained holds it twice (the model and
the serialized bytes), and loading it with from_pretrained maps the file while copying it. Here:
- `write_random`: the model lives on the meta device; each unit (a subtree of at most `UNIT_PARAMS`
  parameters) is materialized, initialized like the eager constructor would, written, and sent back to meta.
- `load_into`: tensors are read with plain file reads (no mmap, so page cache is not counted as the process's
  RSS) straight into a meta-built model (`load_state_dict(assign=True)`: no second copy).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

UNIT_PARAMS = 64 * 1024 ** 2   # parameters per materialized unit (256 MB fp32); SDXL's largest leaf is 13M
DTYPES = {torch.float32: "F32", torch.float16: "F16"}   # what write_random writes
NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def _units(model: nn.Module, limit: int) -> list[tuple[str, nn.Module]]:
    """Maximal subtrees of <= limit parameters, in state_dict order; a bigger leaf-holder is its own unit."""
    out = []

    def visit(prefix: str, module: nn.Module) -> None:
        size = sum(p.numel() for p in module.parameters())
        if size <= limit or not any(True for _ in module.children()):
            out.append((prefix, module))
            return
        if any(True for _ in module.parameters(recurse=False)):
            raise NotImplementedError(f"{prefix or 'model'} owns parameters and exceeds {limit} parameters")
        for name, child in module.named_children():
            visit(f"{prefix}{name}.", child)

    visit("", model)
    return out


def _ancestors(model: nn.Module, prefix: str) -> list[nn.Module]:
    """The modules above the unit at `prefix` ('a.b.3.'): [model, model.a, model.a.b]."""
    out = [model]
    for part in prefix.rstrip(".").split(".")[:-1] if prefix else []:
        out.append(getattr(out[-1], part))
    return out if prefix else []


def _check_no_buffers(model: nn.Module) -> None:
    names = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    if names:
        raise NotImplementedError(f"persistent buffers {sorted(names)[:3]} need real values; write this model eagerly")


def _init_unit(unit: nn.Module, ancestors: list[nn.Module], init: Callable | None) -> None:
    """Torch's constructor init (reset_parameters), then the library's own init, children before parents."""
    for module in reversed(list(unit.modules())):   # post-order-ish: leaves first, like nn.Module.apply
        if any(True for _ in module.parameters(recurse=False)):
            if not hasattr(module, "reset_parameters"):
                raise NotImplementedError(f"{type(module).__name__} has parameters but no reset_parameters")
            module.reset_parameters()
        if init is not None:
            init(module)
    if init is not None:
        # Parents may initialize this unit's tensors (CLIP's text_projection); tensors still on meta ignore it.
        for module in reversed(ancestors):
            init(module)


def write_random(model: nn.Module, path: str | Path, seed: int, init: Callable | None = None,
                 limit: int = UNIT_PARAMS) -> Path:
    """Write a meta-device model's state_dict to one safetensors file with seeded random weights, unit by unit.

    init(module): the library's per-module init (transformers' `_init_weights`); None: torch defaults only
    (diffusers models are built that way). Peak memory: the largest unit.
    """
    _check_no_buffers(model)
    units = _units(model, limit)
    entries, offset = {}, 0
    for prefix, unit in units:
        for name, p in unit.named_parameters():
            nbytes = p.numel() * p.element_size()
            entries[prefix + name] = {"dtype": DTYPES[p.dtype], "shape": list(p.shape),
                                      "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)   # the data starts 8-byte aligned
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for i, (prefix, unit) in enumerate(units):
            unit.to_empty(device="cpu")
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed * 100_003 + i)
                _init_unit(unit, _ancestors(model, prefix), init)
            for _, p in unit.named_parameters():
                f.write(p.detach().contiguous().numpy().tobytes())
            unit.to_empty(device="meta")   # freed before the next unit
    return path


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: Path, dtype: torch.dtype = torch.float32):
    """Yield (name, tensor) read one by one with file reads, cast to dtype (fp16 variants are upcast)."""
    header, base = read_header(path)
    with open(path, "rb", buffering=0) as f:
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = e["data_offsets"]
            f.seek(base + a)
            buf = bytearray(b - a)
            f.readinto(buf)
            if e["dtype"] == "BF16":
                t = torch.frombuffer(buf, dtype=torch.bfloat16) if buf else torch.empty(0, dtype=torch.bfloat16)
            else:
                t = torch.from_numpy(np.frombuffer(buf, dtype=NP_DTYPES[e["dtype"]]))
            yield name, t.reshape(e["shape"]).to(dtype)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of one diffusers/transformers component: fp32 if present, else the fp16 variant."""
    for stem in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            index = folder / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return [folder / s for s in shards]
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return [single]
    raise FileNotFoundError(f"{folder} has no safetensors weights (pickled .bin weights are not read): convert them "
                            "with diffusers' save_pretrained(safe_serialization=True)")


def load_into(model: nn.Module, folder: Path, ignore: tuple[str, ...] = ()) -> nn.Module:
    """Fill a meta-device model from the component folder's safetensors, as float32, without a second copy.

    ignore: name suffixes of saved tensors the model does not take (e.g. buffers older versions persisted).
    """
    state = {}
    for path in weight_files(folder):
        state.update((k, v) for k, v in read_tensors(path) if not k.endswith(ignore))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit the config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the folder is damaged or mixes architectures")
    return model.float().eval()
