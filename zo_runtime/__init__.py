"""zoodip runtime: ZOODiP textual inversion on onnxruntime with numpy only (never torch)."""

__version__ = "0.1.0"
