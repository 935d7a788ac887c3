"""torch.onnx export of multi-GB modules with one copy of the weights in memory (SDXL's 10.3 GB UNet, 2.8 GB bigG).

Where the TorchScript exporter (as Optimum calls it) spends memory, and what is done instead:
1. `nn.Linear` on (B, T, C) inputs is traced as MatMul(x, Transpose(W)); constant folding then stores W^T as a
   new initializer while the module still holds W: ~90% of SDXL's UNet weights twice. `pretranspose_linears`
   swaps each Linear for `MatMulLinear`, which holds W^T itself (converted one layer at a time), so the graph
   gets the same MatMul + Add with no folded copy.
2. Models over 2 GB come out of the exporter as one file per tensor; Optimum then loads them all and saves
   them again (the whole model a second time). `consolidate_external_data` streams them into
   model.onnx_data one tensor at a time.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import onnx
import torch
from torch import nn

DATA_NAME = "model.onnx_data"   # the layout's external-data file (zo_runtime/model_dir.py)
ALIGN = 64                      # tensor offsets in model.onnx_data: aligned for mmap-friendly reads


class MatMulLinear(nn.Module):
    """y = x @ W^T + b with W^T stored (in_features, out_features): the graph's MatMul initializer, unfolded."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """(out, in) view, for code that reads a Linear's weight (dtype, device)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def pretranspose_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in place by MatMulLinear; returns how many.

    Only (parent, name) pairs are listed up front: a list of the modules themselves would keep every old
    weight alive until the end (SDXL-half UNet: 4.86 GiB peak instead of 2.8).
    """
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name in slots:
        setattr(parent, name, MatMulLinear(getattr(parent, name)))   # the old Linear is freed here
    gc.collect()
    return len(slots)


def export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
           dynamic_axes: dict, opset: int) -> Path:
    """torch.onnx.export (TorchScript) into path's folder; weights over 2 GB end in one model.onnx_data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    consolidate_external_data(path)
    return path


def consolidate_external_data(path: Path) -> bool:
    """Move every external tensor of path (any files, offsets) into path's folder/model.onnx_data, streaming.

    Returns False when the model has no external data (nothing to do). Each source file is removed once its
    tensors are copied, so the disk holds the weights once plus one file.
    """
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return False
    folder = path.parent
    tmp = folder / (DATA_NAME + ".tmp")
    refs: dict[Path, int] = {}   # tensors still to copy out of each source file
    for t in external:
        src = folder / next(e.value for e in t.external_data if e.key == "location")
        refs[src] = refs.get(src, 0) + 1
    with open(tmp, "wb") as out:
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            src = folder / info["location"]
            with open(src, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"])) if "length" in info else f.read()
            out.write(b"\0" * (-out.tell() % ALIGN))
            start = out.tell()
            out.write(data)
            del t.external_data[:]
            for key, value in (("location", DATA_NAME), ("offset", str(start)), ("length", str(len(data)))):
                t.external_data.add(key=key, value=value)
            refs[src] -= 1
            if not refs[src]:
                src.unlink()   # copied out: disk holds the weights about once, not twice
    os.replace(tmp, folder / DATA_NAME)
    onnx.save(model, str(path))   # graph only: its tensors now point into model.onnx_data
    return True


def _tensors(graph: onnx.GraphProto):
    """Initializers and Constant-node tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)
