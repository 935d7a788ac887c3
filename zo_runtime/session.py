"""The one checked boundary to onnxruntime: names, dtypes and ranks verified before each run."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import providers as prov

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}
# glibc's M_MMAP_THRESHOLD, pinned at its own 128 KiB default (see fix_malloc_mmap_threshold).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def fix_malloc_mmap_threshold() -> bool:
    """glibc only: keep malloc's mmap threshold at 128 KiB, so every freed tensor goes back to the OS at once.

    With onnxruntime's arena off, each tensor is a malloc. By default glibc raises its mmap threshold to the
    largest block freed so far (up to 32 MiB); from then on big tensors come from the heap, whose freed holes
    stay resident. On the SD 1.5 replica at 512 px that held the w8 UNet at 1.49 GiB peak instead of 1.23 GiB,
    and training at 1.76 GiB instead of 1.35 GiB. Setting the threshold once turns that adjustment off.
    Returns whether it was set: not under another libc, nor when MALLOC_MMAP_THRESHOLD_ is the user's choice.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):   # macOS, Windows, musl: other allocators, other rules
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


_CHUNK = 64 << 20        # bytes read at a time when scanning a graph file (never the whole file in memory)


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain `needle` (read in chunks with overlap)."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def check_external_data(path: str | Path) -> None:
    """ValueError naming the file when an ONNX graph keeps weights outside its own folder.

    Every external-data location must be a relative path that stays inside the graph's folder (symlinks
    resolved) and exists. Graphs without external data (no `location` entry in their bytes) are not parsed."""
    import onnx

    path = Path(path)
    if not _mentions(path, b"location"):
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:              # protobuf's DecodeError & co.: not an ONNX graph at all
        raise ValueError(f"{path} is not a readable ONNX file ({type(err).__name__}: {err}); it is damaged: "
                         "export or quantize the model again") from None
    folder = path.parent.resolve()
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / where).resolve()
        if not where or Path(where).is_absolute() or not target.is_relative_to(folder):
            raise ValueError(f"{path}: tensor {t.name!r} keeps its data at {where!r}, outside the model's "
                             "folder; zoodip refuses it. Use a model folder written by zoodip export/quantize")
        if not target.is_file():
            raise ValueError(f"{path}: tensor {t.name!r} needs {where!r}, which is missing beside it; copy the "
                             "whole model folder (model.onnx with its model.onnx_data)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class OnnxModel:
    """An InferenceSession that checks and casts its inputs (e.g. timestep float vs int64)."""

    def __init__(self, path: str | Path, provider: str = "cpu", provider_options: dict | None = None,
                 threads: int = 0, expect: tuple[str, ...] = ()):
        """expect: input names the caller will feed (the layout's); a graph without them is refused here."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: export the model first (`zoodip export`)")
        check_external_data(path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 0: onnxruntime picks (all physical cores). ZOODIP_THREADS caps it, e.g. to keep a laptop core free
        # or to run two small benchmarks side by side without oversubscribing the cores.
        so.intra_op_num_threads = threads or int(os.environ.get("ZOODIP_THREADS", "0"))
        # Arena off: the arena keeps the peak of every shape seen; training memory is the product.
        so.enable_cpu_mem_arena = False
        fix_malloc_mmap_threshold()     # ... and malloc must return what onnxruntime frees
        self.path = path
        providers = prov.session_providers(provider, provider_options)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as err:      # onnxruntime's Fail / InvalidProtobuf / InvalidGraph / NoSuchFile ...
            raise ValueError(f"onnxruntime cannot load {path} ({_first_line(err)}): the file is damaged or not a "
                             "model zoodip wrote; export or quantize the model again") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [n for n in expect if n not in self.inputs]
        if missing:
            raise ValueError(f"{path} has inputs {sorted(self.inputs)}, not {list(expect)} as zoodip's layout "
                             "defines them (zo_runtime/model_dir.py): export the model with `zoodip export`")

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def input_dtype(self, name: str):
        return ORT_DTYPES[self.inputs[name].type]

    def static_shape(self, name: str) -> tuple | None:
        """The declared shape if every dimension is fixed, else None."""
        shape = self.inputs[name].shape
        return tuple(shape) if all(isinstance(d, int) for d in shape) else None

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run after checking names, ranks and fixed dims; casts dtypes to what the graph declares."""
        missing = set(self.inputs) - set(feeds)
        extra = set(feeds) - set(self.inputs)
        if missing or extra:
            raise ValueError(f"{self.path}: inputs {sorted(self.inputs)} expected, got {sorted(feeds)}")
        cast = {}
        for name, value in feeds.items():
            meta = self.inputs[name]
            value = np.asarray(value)
            if value.ndim != len(meta.shape):
                raise ValueError(f"{self.path}: input {name} has rank {value.ndim}, model wants shape {meta.shape}")
            for axis, (want, got) in enumerate(zip(meta.shape, value.shape)):
                if isinstance(want, int) and want != got:
                    raise ValueError(f"{self.path}: input {name} axis {axis} is {got}, this static-shape model "
                                     f"wants {want} (shape {meta.shape}); use a matching batch/resolution")
            # np.require keeps 0-d inputs 0-d (ascontiguousarray would make a scalar timestep shape (1,)).
            cast[name] = np.require(value, dtype=self.input_dtype(name), requirements="C")
        try:
            return self.session.run(outputs or self.output_names, cast)
        except Exception as err:      # shapes the graph cannot take, kernels that fail on this input ...
            raise ValueError(f"onnxruntime failed running {self.path} ({_first_line(err)}); check the model "
                             "folder and the --resolution / --height / --width it is run at") from None
