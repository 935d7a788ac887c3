"""zoodip: personalize a quantized Stable Diffusion with forward passes only (ZOODiP textual inversion).

The product's face: `zoodip.cli` (the `zoodip` command) and `zoodip.personalize` (export -> quantize ->
train -> samples). The stages themselves live in `export/` (torch side) and `zo_runtime/` (numpy +
onnxruntime only); neither imports this package.
"""
