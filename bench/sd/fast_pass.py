"""Where a UNet pass spends its time, and which engine and settings run it fastest.

    python -m bench.sd.fast_pass profile runs/sd15-onnx runs/sd15-w8 --out bench/results/fast_pass_profile.json
    python -m bench.sd.fast_pass engines --models runs/sd15-onnx runs/sd15-w8 --configs ort ort-nospin \\
        --out bench/results/fast_pass_engines.json
    python -m bench.sd.fast_pass engines --python .venv-openvino/bin/python --models ... --configs ov-f32 ov-bf16 ... \\
        --out bench/results/fast_pass_engines.json --merge
    python -m bench.sd.fast_pass interleave runs/sd15-w8 runs/sd15-w8-fast --rounds 5 --out bench/results/fast_pass_interleaved.json
    python -m bench.sd.fast_pass toy-model runs/toy_quality/models    # w8-fast beside bench.toy.quality's fp32/w8
    python -m bench.sd.fast_pass toy-model runs/toy_quality/models --plan resnet=static --out FILE.json   # gates only
    python -m bench.sd.fast_pass build runs/sd15-onnx runs/sd15-w8 runs/sd15-v-static --plan resnet=static,conv=static
    python -m bench.sd.fast_pass toy-ratio TOY_QUALITY.json ... --method zoodip_fast --reference zoodip --out FILE.json
    python -m bench.sd.fast_pass report --results bench/results --out bench/results/fast_pass_tables.md

profile: onnxruntime's own profiler (SessionOptions.enable_profiling) over a few UNet passes at 512 px, batch 1,
kernel time summed by op type and by UNet node group (export.int8_compute.GROUPS). engines: the same pass under
each engine configuration (CONFIGS), each model and configuration in its own fresh process (so OpenVINO runs
from its own venv with `--python`), median of `--repeats` passes after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from .. import common

# Engine configurations: provider, provider options, session config entries, intra-op threads (0: all cores).
OV_NO_DYNQ = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}     # zoodip's OpenVINO default (providers.DEFAULT_OPTIONS)
CONFIGS = {
    "ort": {"provider": "cpu"},                                            # zoodip's session, as the trainer runs it
    "ort-nospin": {"provider": "cpu", "session": {"session.intra_op.allow_spinning": "0"}},
    "ort-1thread": {"provider": "cpu", "threads": 1},
    "ort-arena": {"provider": "cpu", "arena": True},                       # arena on (zoodip turns it off for memory)
    "ov-f32": {"provider": "openvino", "ov": {**OV_NO_DYNQ, "INFERENCE_PRECISION_HINT": "f32"}},
    "ov-bf16": {"provider": "openvino", "ov": {**OV_NO_DYNQ, "INFERENCE_PRECISION_HINT": "bf16"}},
    "ov-f32-dynq": {"provider": "openvino", "ov": {"INFERENCE_PRECISION_HINT": "f32"}},   # OpenVINO's own dynamic quantization
    "ov-bf16-dynq": {"provider": "openvino", "ov": {"INFERENCE_PRECISION_HINT": "bf16"}},
}


def unet_feeds(model, resolution: int, batch: int = 1, seed: int = 0) -> dict:
    """Seeded random UNet inputs of the real shapes (the trainer's: sample, a PUTS timestep, text states)."""
    rng = np.random.default_rng(seed)
    shape = model.inputs["timestep"].shape
    t = np.array(700.0, np.float32) if not shape else np.full([batch] * len(shape), 700.0, np.float32)
    width = model.inputs["encoder_hidden_states"].shape[-1]          # 768 (SD 1.x) unless the graph fixes it
    return {"sample": rng.standard_normal((batch, 4, resolution // 8, resolution // 8), dtype=np.float32),
            "timestep": t,
            "encoder_hidden_states": rng.standard_normal((batch, 77, width if isinstance(width, int) else 768),
                                                         dtype=np.float32)}


class _Unet:
    """The UNet of a model folder in a session set up as zoodip's OnnxModel does, plus `config`'s settings."""

    def __init__(self, folder: str, config: dict, profile_prefix: str | None = None):
        import onnxruntime as ort
        from zo_runtime import providers as prov
        from zo_runtime.model_dir import ModelDir
        from zo_runtime.session import fix_malloc_mmap_threshold

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = config.get("threads", 0)
        so.enable_cpu_mem_arena = bool(config.get("arena", False))     # zoodip: off (memory is the product)
        for k, v in config.get("session", {}).items():
            so.add_session_config_entry(k, v)
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        fix_malloc_mmap_threshold()
        options = None
        if config.get("ov"):
            options = {"device_type": "CPU", "load_config": json.dumps({"CPU": config["ov"]})}
        providers = prov.session_providers(config.get("provider", "cpu"), options)
        self.session = ort.InferenceSession(str(ModelDir.open(folder).onnx("unet")), so, providers=providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.provider = self.session.get_providers()[0]

    def run(self, feeds: dict):
        return self.session.run(None, feeds)


def time_pass(folder: str, config: dict, resolution: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    model = _Unet(folder, config)
    load = time.perf_counter() - t0
    feeds = unet_feeds(model, resolution)
    model.run(feeds)                                   # warm-up
    secs, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        model.run(feeds)
        secs.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"unet_pass_s": common.time_stats(secs), "cpu_s_median": round(float(np.median(cpu)), 3),
            "load_s": round(load, 2), "provider": model.provider, "peak_rss_gb": common.gib(common.peak_rss_bytes())}


def profile_pass(folder: str, resolution: int, repeats: int, prefix: str) -> dict:
    """Kernel time by op type and by node group, averaged over `repeats` profiled passes (after a warm-up)."""
    from export.int8_compute import GROUPS

    model = _Unet(folder, CONFIGS["ort"], prefix)
    feeds = unet_feeds(model, resolution)
    model.run(feeds)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.run(feeds)
    wall = (time.perf_counter() - t0) / repeats
    path = model.session.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0            # skip the warm-up run
    by_op: dict[str, float] = {}
    by_group: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e6 / repeats
        name = e["name"][:-len("_kernel_time")]
        group = next((g for g, p in GROUPS.items() if re.search(p, name)), None)
        if group is None:
            group = "attention scores+softmax" if re.search(r"/attn[12]/", name) else "other (norms, activations, ...)"
        by_group[group] = by_group.get(group, 0.0) + e["dur"] / 1e6 / repeats
    total = sum(by_op.values())
    rnd = lambda d: {k: {"s": round(v, 3), "share": round(v / total, 4)}
                     for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"wall_s_per_pass": round(wall, 3), "kernel_s_per_pass": round(total, 3), "by_op_type": rnd(by_op),
            "by_group": rnd(by_group), "repeats": repeats}


def interleave(models: list[str], resolution: int, rounds: int) -> dict:
    """All UNets in one process, one pass each per round (A B C A B C ...): the neighbours' load falls on every
    model alike, so the per-round ratio to the first model is robust where separate runs are not."""
    unets = {}
    for folder in models:
        t0 = time.perf_counter()
        unets[folder] = _Unet(folder, CONFIGS["ort"])
        feeds = unet_feeds(unets[folder], resolution)
        unets[folder].run(feeds)                                       # warm-up
        print(f"[fast_pass] loaded {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    secs = {f: [] for f in models}
    for r in range(rounds):
        for folder, unet in unets.items():
            t0 = time.perf_counter()
            unet.run(feeds)
            secs[folder].append(time.perf_counter() - t0)
        print(f"[fast_pass] round {r + 1}: " + ", ".join(f"{_scheme(f)} {secs[f][-1]:.2f}" for f in models), flush=True)
    ref = models[0]
    return {"reference": _scheme(ref), "resolution": resolution, "rounds": rounds,
            "models": {_scheme(f): {"folder": f, "unet_pass_s": common.time_stats(secs[f]),
                                    "ratio_to_reference": common.time_stats([a / b for a, b in zip(secs[f], secs[ref])])}
                       for f in models},
            "peak_rss_gb_all_loaded": common.gib(common.peak_rss_bytes())}


def _scheme(folder: str) -> str:
    """The result key of a model folder: its scheme, or the folder's name for timing-only variants."""
    m = json.loads((Path(folder) / "manifest.json").read_text())
    return Path(folder).name if m.get("variant") else m.get("scheme") or "fp32"


def run_profile(models: list[str], resolution: int, repeats: int, out: Path, merge: bool) -> Path:
    result = json.loads(out.read_text()) if merge and out.is_file() else {"models": {}}
    result.update(machine=common.machine_facts(), resolution=resolution,
                  command="python -m bench.sd.fast_pass " + " ".join(sys.argv[1:]))
    for folder in models:
        print(f"[fast_pass] profile {folder} ...", flush=True)
        res = common.run_isolated("bench.sd.fast_pass", ["worker-profile", folder, "--resolution", str(resolution),
                                                      "--repeats", str(repeats)])
        res["folder"] = folder
        result["models"][_scheme(folder)] = res
        top = list(res["by_op_type"].items())[:6]
        print(f"[fast_pass]   {res['wall_s_per_pass']} s/pass; " + ", ".join(f"{k} {v['share']:.0%}" for k, v in top),
              flush=True)
    result["machine_after"] = {"loadavg_1_5_15": common.machine_facts()["loadavg_1_5_15"]}
    return common.write_json(out, result)


def run_engines(models: list[str], configs: list[str], python: str, resolution: int, repeats: int, out: Path,
                merge: bool) -> Path:
    result = json.loads(out.read_text()) if merge and out.is_file() else {"runs": {}}
    result.setdefault("commands", []).append("python -m bench.sd.fast_pass " + " ".join(sys.argv[1:]))
    result["machine"] = common.machine_facts()
    for folder in models:
        for name in configs:
            key = f"{_scheme(folder)} {name}"
            print(f"[fast_pass] {key} ...", flush=True)
            args = ["-m", "bench.sd.fast_pass", "worker-engine", folder, name, "--resolution", str(resolution),
                    "--repeats", str(repeats)]
            try:
                res = _isolated(python, args)
            except RuntimeError as err:
                res = {"error": str(err)}
            res.update(folder=folder, config=name, settings=CONFIGS[name])
            result["runs"][key] = res
            print(f"[fast_pass]   {res.get('unet_pass_s', {}).get('median')} s ({res.get('provider', res.get('error'))})",
                  flush=True)
            common.write_json(out, result)
    return common.write_json(out, result)


def _isolated(python: str, args: list[str]) -> dict:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="zoodip-fast-") as tmp:
        res_path = Path(tmp) / "result.json"
        log = Path(tmp) / "log.txt"
        proc = common.run_measured([python, *args, "--result", str(res_path)], log, timeout=3600)
        if proc["returncode"]:
            raise RuntimeError(f"exit {proc['returncode']}: {log.read_text()[-800:]}")
        data = json.loads(res_path.read_text())
    data["process"] = proc
    return data


def build_variant(export: Path, w8: Path, out: Path, plan: str, calib_px: int = 256) -> Path:
    """A timing-only w8-fast variant: OUT = the w8 folder (hard links) with the export's UNet rewritten by `plan`.

    No gates (bench.sd.int8_groups measures those on the toy model); static ranges come from two random inputs at
    calib_px, which sets the kernels but not meaningful scales: for pass times and memory only.
    """
    import os
    import shutil
    import onnx
    from export.model_files import save_model
    from export.quantize import QuantizeConfig, _w8_fast
    from zo_runtime.model_dir import ModelDir

    if out.exists():
        print(f"{out} exists; reusing it")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(w8, tmp, copy_function=os.link, ignore=lambda d, names: names if Path(d).name == "unet" else [])
    src = ModelDir.open(export)
    rng = np.random.default_rng(0)
    feeds = lambda: [{"sample": rng.standard_normal((1, 4, calib_px // 8, calib_px // 8), dtype=np.float32),
                      "timestep": np.array(700.0, np.float32),
                      "encoder_hidden_states": rng.standard_normal((1, 77, src.dim), dtype=np.float32)} for _ in range(2)]
    model = _w8_fast(onnx.load(str(src.onnx("unet"))), "unet", src.onnx("unet"),
                     QuantizeConfig(scheme="w8-fast", int8_plan=plan), feeds)
    save_model(model, tmp / "unet" / "model.onnx")
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest.update(scheme="w8-fast", variant={"plan": plan, "timing_only": True}, gates=None, files={})
    (tmp / "manifest.json").unlink()           # a hard link to w8's: write a new file, not through the link
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tmp.rename(out)
    return out


def toy_ratio(files: list[Path], method: str, reference: str) -> dict:
    """Paired ratio of `method`'s final concept fidelity to `reference`'s over every (draw, concept) run, with
    bench.toy.pool's bootstrap interval, and the two pooled curves."""
    from ..toy.pool import cluster_ratio_interval, pooled_curve, ratio_interval, units

    rows = [r for r in units([json.loads(f.read_text()) for f in files]) if method in r and reference in r]
    if not rows:
        raise ValueError(f"no concept run has both {method} and {reference}")
    ours, ref = (np.array([r[k] for r in rows]) for k in (method, reference))
    ratio, lo, hi = ratio_interval(ours, ref)
    by_concept = cluster_ratio_interval(ours, ref, [r["concept"] for r in rows])
    return {"method": method, "reference": reference, "runs": len(rows),
            "draws": sorted({r["draw"] for r in rows}), "concept_fidelity": round(float(ours.mean()), 4),
            "reference_fidelity": round(float(ref.mean()), 4), "ratio": round(ratio, 3),
            "ratio_ci95": [round(lo, 3), round(hi, 3)], "concepts": len({r["concept"] for r in rows}),
            "ratio_ci95_by_concept": [round(x, 3) for x in by_concept], "wins": int(np.sum(ours > ref)),
            "losses": int(np.sum(ours < ref)), "per_run": [{k: r[k] for k in ("draw", "concept", method, reference)}
                                                           for r in rows],
            "curves": {m: pooled_curve(rows, m) for m in (method, reference)},
            "files": [str(f) for f in files]}


def toy_model(models: Path) -> Path:
    """MODELS/w8-fast from bench.toy.quality's MODELS/fp32 and MODELS/calib (zoodip_fast's model)."""
    from export.quantize import QuantizeConfig, quantize_model
    if not (models / "fp32").is_dir():
        raise FileNotFoundError(f"{models}/fp32 is missing: run bench.toy.quality once (it exports the toy model)")
    return quantize_model(models / "fp32", models / "w8-fast",
                          QuantizeConfig(scheme="w8-fast", calib_images=str(models / "calib")))


def toy_plans(models: Path, plans: list[str]) -> dict:
    """Each int8 plan quantized on the toy model (MODELS/v-<i>, gates recorded, not enforced): the gates the
    trainer's mus would see. The plan is added to w8-fast's own (export.quantize.FAST_PLAN)."""
    from export.quantize import FAST_PLAN, QuantizeConfig, quantize_model
    rows = []
    for i, extra in enumerate(plans):
        plan = ",".join(filter(None, (FAST_PLAN, extra)))
        out = quantize_model(models / "fp32", models / f"v-{i}", QuantizeConfig(
            scheme="w8-fast", calib_images=str(models / "calib"), int8_plan=plan, gate=False))
        g = json.loads((out / "manifest.json").read_text())["gates"]
        rows.append({"plan": plan, "cond_cosine": g["unet"]["cond_cosine"], "output_cosine": g["unet"]["cosine"],
                     "zo_corr": {mu: v["corr"] for mu, v in g["zo"].items()}, "failed": g["failed"]})
        print(f"{plan}: cond {rows[-1]['cond_cosine']}, zo {rows[-1]['zo_corr']}", flush=True)
    return {"what": "toy model, w8-fast plus each plan: quantize gates (trainer perturbations)", "plans": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    tm = sub.add_parser("toy-model")
    tm.add_argument("models", type=Path)
    tm.add_argument("--plan", action="append", default=[], help="extra int8 plans to gate (MODELS/v-<i>), not build w8-fast")
    tm.add_argument("--out", type=Path, help="--plan: JSON file of the gates (required with --plan)")
    il = sub.add_parser("interleave")
    il.add_argument("models", nargs="+")
    il.add_argument("--rounds", type=int, default=5)
    il.add_argument("--resolution", type=int, default=512)
    il.add_argument("--out", type=Path, required=True)
    il.add_argument("--merge", action="store_true", help="add this run to --out's runs")
    b = sub.add_parser("build")
    for name in ("export", "w8", "out"):
        b.add_argument(name, type=Path)
    b.add_argument("--plan", required=True, help="int8 plan (export.quantize.parse_plan); '' = w8 + fused attention")
    r = sub.add_parser("report")
    r.add_argument("--results", type=Path, default=Path("bench/results"))
    r.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("toy-ratio")
    t.add_argument("results", nargs="+", type=Path)
    t.add_argument("--method", default="zoodip_fast")
    t.add_argument("--reference", default="zoodip")
    t.add_argument("--out", type=Path, required=True)
    pr = sub.add_parser("profile")
    pr.add_argument("models", nargs="+")
    en = sub.add_parser("engines")
    en.add_argument("--models", nargs="+", required=True)
    en.add_argument("--configs", nargs="+", default=["ort"], choices=list(CONFIGS))
    en.add_argument("--python", default=sys.executable, help="interpreter of the engine's venv (OpenVINO: .venv-openvino)")
    for q in (pr, en):
        q.add_argument("--resolution", type=int, default=512)
        q.add_argument("--repeats", type=int, default=3)
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--merge", action="store_true", help="keep earlier entries of --out")
    for name in ("worker-profile", "worker-engine"):
        w = sub.add_parser(name)
        w.add_argument("folder")
        if name == "worker-engine":
            w.add_argument("config", choices=list(CONFIGS))
        w.add_argument("--resolution", type=int, default=512)
        w.add_argument("--repeats", type=int, default=3)
        w.add_argument("--result", required=True)
    a = p.parse_args(argv)
    if a.cmd == "interleave":
        before = common.machine_facts()
        res = interleave(a.models, a.resolution, a.rounds)
        res.update(machine=before, loadavg_after=common.machine_facts()["loadavg_1_5_15"],
                   command="python -m bench.sd.fast_pass " + " ".join(sys.argv[1:] if argv is None else argv))
        out = json.loads(a.out.read_text()) if a.merge and a.out.is_file() else {"runs": []}
        out["runs"].append(res)
        common.write_json(a.out, out)
        for k, v in res["models"].items():
            print(f"{k}: {v['unet_pass_s']['median']} s, x{v['ratio_to_reference']['median']} of {res['reference']}")
    elif a.cmd == "toy-model" and a.plan:
        if a.out is None:
            p.error("toy-model --plan needs --out FILE.json: where to write the gates")
        res = toy_plans(a.models, a.plan)
        res.update(machine=common.machine_facts(),
                   command="python -m bench.sd.fast_pass " + " ".join(sys.argv[1:] if argv is None else argv))
        common.write_json(a.out, res)
    elif a.cmd == "toy-model":
        print(f"wrote {toy_model(a.models)}")
    elif a.cmd == "report":
        from .fast_pass_report import report
        text = report(a.results)
        a.out.write_text(text)
        print(text)
    elif a.cmd == "toy-ratio":
        res = toy_ratio(a.results, a.method, a.reference)
        res["command"] = "python -m bench.sd.fast_pass " + " ".join(sys.argv[1:] if argv is None else argv)
        common.write_json(a.out, res)
        print(f"{a.method} / {a.reference}: {res['ratio']} (95% {res['ratio_ci95'][0]}-{res['ratio_ci95'][1]}) over "
              f"{res['runs']} runs; {res['concept_fidelity']} vs {res['reference_fidelity']}; resampling its "
              f"{res['concepts']} concepts: {res['ratio_ci95_by_concept'][0]}-{res['ratio_ci95_by_concept'][1]}")
    elif a.cmd == "build":
        print(f"wrote {build_variant(a.export, a.w8, a.out, a.plan)}")
    elif a.cmd == "worker-profile":
        res = profile_pass(a.folder, a.resolution, a.repeats, str(Path(a.result).with_suffix("")))
        res["machine"] = common.machine_facts()
        common.write_json(a.result, res)
    elif a.cmd == "worker-engine":
        res = time_pass(a.folder, CONFIGS[a.config], a.resolution, a.repeats)
        res["machine"] = common.machine_facts()
        common.write_json(a.result, res)
    elif a.cmd == "profile":
        print(f"wrote {run_profile(a.models, a.resolution, a.repeats, a.out, a.merge)}")
    else:
        print(f"wrote {run_engines(a.models, a.configs, a.python, a.resolution, a.repeats, a.out, a.merge)}")


if __name__ == "__main__":
    main()
