"""Peak RSS and wall time of the SDXL replica, its export and its w8 quantization, and export parity with torch.

    python -m bench.sd.sdxl_memory --scale half --base /work/runs/sdxl/half --calib-images PHOTOS \\
        --out bench/results/sdxl_memory_half.json --max-rss-gb 5.8
    python -m bench.sd.sdxl_memory --scale full --base /work/runs/sdxl/full --calib-images PHOTOS \\
        --out bench/results/sdxl_memory_full.json

`half` is SDXL base with every width halved (channels, both text encoders, cross-attention, pooled width; same
blocks, depths and head counts): a 2.4 GB UNet, so the over-2 GB export path (external data) runs, within a
shared machine's budget. `full` is `zoodip replica sdxl`. Each stage runs in its own process (os.wait4 rusage);
--max-rss-gb kills a stage whose resident set passes it (and marks it killed). Finished stages are reused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import common

GOAL_GB = 20.0   # issue #18: SDXL export and quantize peak RSS goal on a 24 GB machine
SCALES = ("half", "full")


def half_spec() -> dict:
    """SDXL base with widths halved: blocks, depths, head counts and the 6 time ids kept."""
    from export.replica import SPECS
    xl = SPECS["sdxl"]
    t1 = dict(xl["text"], hidden_size=384, intermediate_size=1536, num_attention_heads=6, projection_dim=384)
    t2 = dict(xl["text_2"], hidden_size=640, intermediate_size=2560, num_attention_heads=10, projection_dim=640)
    unet = dict(xl["unet"], block_out_channels=[160, 320, 640], cross_attention_dim=384 + 640,
                addition_time_embed_dim=128, projection_class_embeddings_input_dim=640 + 6 * 128)
    return dict(xl, unet=unet, text=t1, text_2=t2)


def write(scale: str, out: str, seed: int = 0) -> None:
    """Stage body: the replica (half: registered as 'sdxl-half' for this process only)."""
    from export import replica
    kind = "sdxl"
    if scale == "half":
        kind = "sdxl-half"
        replica.SPECS[kind] = half_spec()
    replica.write_replica(kind, out, seed=seed)


def parity(diffusers_dir: str, onnx_dir: str, result: str) -> None:
    """Stage body: both text encoders and the UNet vs torch; one model in memory at a time."""
    import numpy as np
    import torch
    from export.sdxl import load_clip, load_unet
    from zo_runtime.model_dir import ModelDir
    from zo_runtime.session import OnnxModel
    from zo_runtime.text import SdxlTextEncoder
    torch.set_num_threads(2)
    model = ModelDir.open(onnx_dir)
    prompts = ["a photo of a dog", "an oil painting of a red fox in the snow!"]
    text = SdxlTextEncoder(model)
    hidden, pooled = text(prompts)
    ids = text.tokenize(prompts)
    del text
    out = {}
    for k, sub in enumerate(model.text_encoders):
        enc = load_clip(Path(diffusers_dir) / sub, with_projection=k == 1)
        with torch.no_grad():
            ref = enc(torch.from_numpy(ids[k]), output_hidden_states=True)
        cols = slice(0, model.dims[0]) if k == 0 else slice(model.dims[0], None)
        out[sub] = float(np.abs(hidden[..., cols] - ref.hidden_states[-2].numpy()).max())
        if k == 1:
            out["text_embeds"] = float(np.abs(pooled - ref.text_embeds.numpy()).max())
        del enc, ref
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 32, 32)).astype(np.float32), "timestep": np.array(600.0),
             "encoder_hidden_states": hidden[:1], "text_embeds": pooled[:1],
             "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)}
    got = OnnxModel(model.onnx("unet")).run(feeds)[0]
    unet = load_unet(Path(diffusers_dir) / "unet")
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        want = unet(t["sample"], 600.0, t["encoder_hidden_states"], added_cond_kwargs={
            "text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample.numpy()
    out["unet"] = float(np.abs(got - want).max())
    out["unet_output_max"] = float(np.abs(want).max())
    Path(result).write_text(json.dumps(out))


def _run(cmd: list[str], log: Path, max_rss_gb: float | None, min_available_gb: float | None) -> dict:
    """common.run_guarded: the stage is killed past max_rss_gb, or when the machine runs low (min_available_gb)."""
    r = common.run_guarded(cmd, log, max_rss_gb=max_rss_gb, min_available_gb=min_available_gb)
    r["killed_over_rss_gb"] = max_rss_gb if r["killed"] and r["killed"].startswith("RSS") else None
    r["rss_timeline"] = _thin(r["rss_timeline"])
    return r


def _thin(timeline: list, points: int = 200) -> list:
    """At most `points` [s, GiB] pairs, each the max of its bucket (the peak survives)."""
    k = max(1, -(-len(timeline) // points))
    return [[b[0][0], max(r for _, r in b)] for b in (timeline[i:i + k] for i in range(0, len(timeline), k))]


def stages(scale: str, base: Path, calib: str, quantize_args: list[str]) -> list[tuple[str, Path, list[str]]]:
    py = sys.executable
    cli = [py, "-c", "from zoodip.cli import main; main()"]
    onnx_dir, w8 = Path(f"{base}-onnx"), Path(f"{base}-w8")
    return [
        ("replica", base / "model_index.json", [py, "-m", "bench.sd.sdxl_memory", "--stage", "replica", "--scale", scale,
                                                "--base", str(base)]),
        ("export", onnx_dir / "manifest.json", [*cli, "export", str(base), str(onnx_dir)]),
        ("parity", Path(f"{base}-parity.json"), [py, "-m", "bench.sd.sdxl_memory", "--stage", "parity", "--base",
                                                 str(base)]),
        ("quantize_w8", w8 / "manifest.json", [*cli, "quantize", str(onnx_dir), str(w8), "--scheme", "w8",
                                               "--calib-images", calib, *quantize_args]),
    ]


STAGES = ("replica", "export", "parity", "quantize_w8")


def run(scale: str, base: Path, calib: str, out: Path, max_rss_gb: float | None, quantize_args: list[str],
        only: tuple[str, ...] = STAGES, min_available_gb: float | None = 1.5) -> Path:
    """Run the stages (`only`: a subset, in order) whose output is missing; a stage measured in an earlier call
    and kept in `out` stays there (so stages can be run one at a time, each in its own call)."""
    result = {"scale": scale, "base": str(base), "goal_peak_rss_gb": GOAL_GB, "stages": {},
              "machine": common.machine_facts()}
    if out.is_file():
        earlier = json.loads(out.read_text())
        if earlier.get("scale") == scale and earlier.get("base") == str(base):
            result["stages"] = {k: v for k, v in earlier.get("stages", {}).items() if not v.get("reused")}
    result["note"] = common.load_note(result["machine"])
    log_dir = base.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, done, cmd in stages(scale, base, calib, quantize_args):
        if name not in only:
            continue
        if done.is_file():
            result["stages"].setdefault(name, {"reused": True})
            continue
        print(f"[bench.sd.sdxl_memory] {name} ...", flush=True)
        r = _run(cmd, log_dir / f"{base.name}_{name}.log", max_rss_gb, min_available_gb)
        result["stages"][name] = r
        print(f"[bench.sd.sdxl_memory]   {r['returncode']=} peak {r['peak_rss_gb']} GiB, {r['wall_seconds']} s", flush=True)
        common.write_json(out, result)
        if r["returncode"] != 0:
            raise RuntimeError(f"{name} failed ({r['killed'] or 'exit ' + str(r['returncode'])}); "
                               f"see {log_dir / f'{base.name}_{name}.log'}")
    parity_file = Path(f"{base}-parity.json")
    if parity_file.is_file():
        result["parity_max_abs_error"] = json.loads(parity_file.read_text())
    result["sizes_gb"] = {p.relative_to(base.parent).as_posix(): common.gib(p.stat().st_size)
                          for d in (base, Path(f"{base}-onnx"), Path(f"{base}-w8")) if d.is_dir()
                          for p in sorted(d.rglob("*")) if p.name.startswith(("model.onnx", "diffusion_pytorch_model",
                                                                             "model.safetensors"))}
    return common.write_json(out, result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=SCALES, default="half")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--calib-images", default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--max-rss-gb", type=float, default=None)
    p.add_argument("--min-available-gb", type=float, default=1.5,
                   help="kill a stage when the machine's MemAvailable falls below this (shared machines)")
    p.add_argument("--quantize-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `zoodip quantize` options, e.g. --gate-resolution 256")
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES),
                   help="run these stages only (each still skipped when its output exists); earlier results in --out are kept")
    p.add_argument("--stage", choices=("replica", "parity"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stage == "replica":
        return write(a.scale, str(a.base))
    if a.stage == "parity":
        return parity(str(a.base), f"{a.base}-onnx", f"{a.base}-parity.json")
    if not a.out or (not a.calib_images and "quantize_w8" in a.only):
        p.error("--out is required, and --calib-images for the quantize_w8 stage")
    path = run(a.scale, a.base.resolve(), a.calib_images, a.out, a.max_rss_gb, a.quantize_args, tuple(a.only),
               a.min_available_gb)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
