"""Markdown evidence tables of the fast-pass study, from the JSON results (`python -m bench.sd.fast_pass report`)."""
from __future__ import annotations

import json
from pathlib import Path


# The configurations of the evidence table: label, the toy int8 plan (bench.sd.int8_groups rows; None: not a plan),
# and the key of its SD 1.5 replica timing in fast_pass_engines.json (None: not timed there).
TABLE = (
    ("fp32 (onnxruntime)", None, "fp32 ort"),
    ("w8 (today's default)", None, "w8 ort"),
    ("w8 + fused attention", "", "sd15-v-fused ort"),
    ("w8-fast: + attention & feed-forward int8 (MatMulNBits block 32)", "attention=block,feed_forward=block", "w8-fast ort"),
    ("w8-fast + text K/V block, time embedding dynamic",
     "text_kv=block,attention=block,feed_forward=block,time_embedding=dynamic", None),
    ("attention & feed-forward int8 per-tensor dynamic (DynamicQuantizeMatMul)", "attention=dynamic,feed_forward=dynamic",
     "sd15-v-dyn ort"),
    ("w8-fast + ResNet/other/proj convs static int8 (QLinearConv)",
     "attention=block,feed_forward=block,resnet=static,conv=static,proj=static", "sd15-v-block-convs ort"),
    ("all int8 but text K/V (dynamic MatMuls, static convs)",
     "text_kv=dynamic,attention=dynamic,feed_forward=dynamic,time_embedding=dynamic,proj=static,resnet=static,conv=static",
     "sd15-v-all ort"),
)
ENGINE_ROWS = (("fp32", "ov-f32"), ("fp32", "ov-bf16"), ("w8", "ov-f32"), ("w8", "ov-f32-dynq"), ("w8", "ov-bf16"),
               ("w8-fast", "ov-f32"))


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


def report(results: Path) -> str:
    """Markdown tables of every configuration tried, from the JSON files in `results`."""
    unit, train = _load(results, "int8_groups_unit.json"), _load(results, "int8_groups_train.json")
    engines, eg = _load(results, "fast_pass_engines.json").get("runs", {}), _load(results, "engine_gates.json")
    rows_u = {r["plan"]: r for r in unit.get("rows", [])}
    rows_t = {r["plan"]: r for r in train.get("rows", [])}
    w8_pass = engines.get("w8 ort", {}).get("unet_pass_s", {}).get("median")
    f = lambda x, n=3: "-" if x is None else f"{x:.{n}f}"

    def zo(row, mus):
        return " / ".join(f(row["zo_corr"].get(f"{mu:g}")) for mu in mus) if row else "-"

    out = ["### Every configuration: SD 1.5 replica pass time (512 px, batch 1) and toy-model gates", "",
           "Pass: median of `fast_pass engines` (onnxruntime CPU, same run). Gates: `bench.sd.int8_groups` on the trained "
           "toy model vs fp32 (cond cos = conditioning cosine, mean; ZO corr over 32 directions at mu = 1e-3 / 3e-3 / "
           "1e-2 / 3e-2 / 1e-1; unit: unit directions (gate 3 of w8), train: N(0, I_d) as `zoodip train` draws them).", "",
           "| configuration | pass (s) | x w8 | cond cos | ZO corr, unit | ZO corr, train |", "|---|---|---|---|---|---|"]
    mus = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    for label, plan, key in TABLE:
        t = engines.get(key, {}).get("unet_pass_s", {}).get("median") if key else None
        ru = rows_u.get(plan or "(none: w8)") if plan is not None else None
        rt = rows_t.get(plan or "(none: w8)") if plan is not None else None
        if plan is None and label.startswith("fp32"):
            cond, zu, zt = "1 (reference)", "1", "1"
        elif plan is None:
            g = _load(results, "quantize_gates_toyworld.json").get("gates", {}).get("w8")
            cond = f(g["unet"]["cond_cosine"]) if g else "-"
            zu = (f"{f(g['zo']['0.001']['corr'])} (1e-3) / {f(g['zo']['0.01']['corr'])} (1e-2)") if g else "-"
            zt = "-"
        else:
            cond = f((ru or rt or {}).get("cond_cosine"))
            zu, zt = zo(ru, mus), zo(rt, mus)
        ratio = f(t / w8_pass, 2) if t and w8_pass else "-"
        out.append(f"| {label} | {f(t, 2)} | {ratio} | {cond} | {zu} | {zt} |")
    for scheme, cfg in ENGINE_ROWS:
        t = engines.get(f"{scheme} {cfg}", {}).get("unet_pass_s", {}).get("median")
        g = eg.get("rows", {}).get(f"{scheme} {cfg}")
        zu = " / ".join(f(g["zo"].get(f"{mu:g}", {}).get("corr")) for mu in mus) if g else "-"
        ratio = f(t / w8_pass, 2) if t and w8_pass else "-"
        out.append(f"| {scheme} on OpenVINO `{cfg}` | {f(t, 2)} | {ratio} | {f(g['cond_cosine']) if g else '-'} | "
                   f"{zu} | - |")
    out += ["", "### One UNet group at a time in int8 (the rest w8 + fused attention): toy-model gates", "",
            "| int8 compute on | cond cos (min) | ZO corr, unit, mu 1e-3 / 3e-3 / 1e-2 / 3e-2 / 1e-1 | ZO corr, train |",
            "|---|---|---|---|"]
    for plan, r in rows_u.items():
        if "," in plan:
            continue
        out.append(f"| {plan} | {f(r['cond_cosine'])} ({f(r['cond_cosine_min'])}) | {zo(r, mus)} | "
                   f"{zo(rows_t.get(plan), mus)} |")
    out += _conv_plans(_load(results, "int8_conv_plans_toy.json"))
    prof = _load(results, "fast_pass_profile.json").get("models", {})
    if prof:
        groups = sorted({g for m in prof.values() for g in m["by_group"]}, key=lambda g: -prof.get("fp32", next(
            iter(prof.values())))["by_group"].get(g, {}).get("s", 0))
        names = list(prof)
        out += ["", "### Where a pass goes (onnxruntime profiler, SD 1.5 replica, 512 px, batch 1; kernel s per pass)", "",
                "| node group | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for g in groups:
            out.append(f"| {g} | " + " | ".join(
                f"{f(prof[n]['by_group'].get(g, {}).get('s'), 2)} ({prof[n]['by_group'].get(g, {}).get('share', 0):.0%})"
                for n in names) + " |")
        out.append("| **total kernel time / wall per pass** | " + " | ".join(
            f"{prof[n]['kernel_s_per_pass']:.2f} / {prof[n]['wall_s_per_pass']:.2f}" for n in names) + " |")
    kern = _load(results, "int8_kernels.json").get("rows", [])
    if kern:
        ops = list(dict.fromkeys(r["op"] for r in kern))
        kinds = list(dict.fromkeys(r["kernel"] for r in kern))
        by = {(r["op"], r["kernel"]): r for r in kern}
        out += ["", "### One op per kernel (ms, median; relative error vs fp32 in brackets)", "",
                "| op | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for op in ops:
            out.append(f"| {op} | " + " | ".join(
                f"{by[op, k]['median_ms']:.1f} ({by[op, k]['rel_error']:.3f})" if (op, k) in by else "-"
                for k in kinds) + " |")
    return "\n".join(out) + "\n"


def _conv_plans(res: dict) -> list[str]:
    """w8-fast plus int8 convolutions, through `zoodip quantize`'s own gates (trainer perturbations)."""
    if not res:
        return []
    out = ["", "### w8-fast plus int8 convolutions: quantize's gates on the toy model (`fast_pass toy-model --plan`)",
           "", "| int8 plan | cond cos (gate >= 0.9) | output cos | ZO corr, train, mu 1e-3 / 3e-3 / 1e-2 | gates |",
           "|---|---|---|---|---|"]
    for r in res["plans"]:
        zo = " / ".join(f"{r['zo_corr'][mu]:.3f}" for mu in ("0.001", "0.003", "0.01"))
        out.append(f"| {r['plan']} | {r['cond_cosine']:.3f} | {r['output_cosine']:.5f} | {zo} | "
                   f"{'; '.join(r['failed']) or 'pass'} |")
    return out
