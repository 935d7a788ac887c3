"""The house rules, read from the source (AST, not a runtime import trick), and the CLI's shape.

- zo_runtime/ never imports torch, diffusers, transformers, optimum, export, zoodip, bench or models;
- zo_runtime/zo.py and zo_runtime/priors.py never reach onnxruntime, not even through zo_runtime modules;
- export/ may import zo_runtime/ but never zoodip, bench or models; zoodip/ never bench or models.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "optimum")
RULES = {  # package -> top-level modules it must never import
    "zo_runtime": (*HEAVY, "export", "zoodip", "bench", "models"),
    "export": ("zoodip", "bench", "models"),
    "zoodip": ("bench", "models"),
}
PURE = ("zo_runtime.zo", "zo_runtime.priors")   # numpy only: never onnxruntime, directly or transitively


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks (imports for type hints only)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(path: Path, root: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved; type-only ones skipped)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip, here = _type_checking_lines(tree), _module(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)     # `from . import zo` names a module
    return out


def violations(root: Path) -> list[str]:
    """Every broken rule under root, as 'module imports name'."""
    found, graph = [], {}
    for package, banned in RULES.items():
        for path in sorted((root / package).rglob("*.py")):
            mod, names = _module(path, root), imports(path, root)
            graph[mod] = names
            found += [f"{mod} imports {n}" for n in sorted(names) if n.split(".")[0] in banned]
    for start in PURE:
        seen, todo = set(), [start]
        while todo:
            mod = todo.pop()
            if mod in seen:
                continue
            seen.add(mod)
            for name in graph.get(mod, ()):
                if name.split(".")[0] == "onnxruntime":
                    found.append(f"{start} reaches onnxruntime through {mod}")
                todo += [n for n in (name, name.rpartition(".")[0]) if n in graph]
    return found


def test_the_repository_keeps_the_import_rules():
    assert violations(REPO) == []


def test_the_rule_check_catches_a_forbidden_import(tmp_path):
    """The check can fail: a copy of the packages with one forbidden import added is caught."""
    for package in RULES:
        for path in (REPO / package).rglob("*.py"):
            dst = tmp_path / path.relative_to(REPO)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert violations(tmp_path) == []
    (tmp_path / "zo_runtime" / "text.py").write_text("import onnxruntime\nfrom export import replica\n")
    bad = violations(tmp_path)
    assert "zo_runtime.text imports export" in bad and "zo_runtime.text imports export.replica" in bad
    assert "zo_runtime.priors reaches onnxruntime through zo_runtime.text" not in bad   # type-only import
    (tmp_path / "zo_runtime" / "priors.py").write_text("from .text import TextEncoder\n")
    assert "zo_runtime.priors reaches onnxruntime through zo_runtime.text" in violations(tmp_path)


def _option_names(cmd) -> list[str]:
    import click
    return [p.opts[0] for p in cmd.params if isinstance(p, click.Option)]


def test_train_help_stays_short_and_every_setting_is_reachable():
    from zo_runtime.train_config import TrainConfig
    from zoodip.cli.train import personalize, train

    opts = _option_names(train)
    assert len(opts) + 1 <= 23, opts                         # + --help; 23 since --init-candidates
    assert set(_option_names(personalize)) - set(opts) == {"--scheme"}
    named = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")}
    others = {f.name for f in dataclasses.fields(TrainConfig)} - named
    assert all(f"{n}=" in train.epilog for n in others)     # listed for --set with their defaults


def test_cli_values_and_set_pairs_build_the_config():
    from click.testing import CliRunner

    from zo_runtime.train_config import TrainConfig
    from zoodip.cli import main
    from zoodip.cli._options import build_config

    cfg = build_config(TrainConfig, {"token": "sks", "init": "dog", "steps": 7, "provider_options": ("a=b",)},
                       ("mu=1e-2", "t_range=400,800", "subspace=false", "prior-rank=8"))
    assert (cfg.steps, cfg.mu, cfg.t_range, cfg.subspace, cfg.prior_rank) == (7, 1e-2, (400, 800), False, 8)
    assert cfg.provider_options == (("a", "b"),)
    defaults = TrainConfig(token="sks", init="dog")
    assert build_config(TrainConfig, {"token": "sks", "init": "dog"}) == defaults
    for bad, words in (("nope=1", "NAME one of"), ("mu=abc", "mu='abc'"), ("t_range=1", "2 comma-separated"),
                       ("subspace=maybe", "true or false")):
        res = CliRunner().invoke(main, ["train", "m", "--images", "i", "--out", "o", "--token", "sks", "--init",
                                        "dog", "--set", bad])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("name", ["zoodip", "export", "zo_runtime"])
def test_only_the_product_packages_are_installed(name):
    import tomllib
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert f"{name}*" in found["include"] and not {"bench*", "models*"} & set(found["include"])


@pytest.mark.slow
def test_a_copy_of_the_repository_works_with_nothing_beside_it(tmp_path):
    """export -> train -> generate in a copy of the tracked files, in a folder with nothing else in it
    (so nothing can be read from a folder beside the repository or elsewhere outside it)."""
    import shutil
    import subprocess
    import sys

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    copy = tmp_path / "alone" / "zoodip"
    for rel in files:
        if (REPO / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy), "HOME": str(tmp_path / "home"), "ZOODIP_THREADS": "1"}

    def run(*args: str) -> str:
        res = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res.stdout

    cli = ("-c", "import zoodip.cli as c, zo_runtime, export; assert all(str(m.__file__).startswith("
           f"{str(copy)!r}) for m in (c, zo_runtime, export)), 'not the copy'; c.main()")
    run(*cli, "replica", "tiny", "w/tiny")
    run(*cli, "export", "w/tiny", "w/onnx")
    run("-m", "models.toyworld.concept", "w/photos")
    run(*cli, "train", "w/onnx", "--images", "w/photos", "--token", "sks", "--init", "circle", "--out", "w/run",
        "--steps", "3", "--set", "progress=false")
    run(*cli, "generate", "w/onnx", "--embeds", "w/run/learned_embeds.safetensors", "--prompt", "a photo of sks",
        "--out", "w/samples", "-n", "1", "--steps", "2")
    assert (copy / "w" / "samples" / "grid.png").is_file()
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["zoodip"]      # nothing was put beside it


def test_the_cli_replica_kinds_are_the_exporters():
    from export.replica import KINDS
    from zoodip.cli.export import REPLICAS
    assert REPLICAS == KINDS


def test_the_cli_schemes_are_the_quantizers():
    from export.quantize import SCHEMES
    from zoodip.cli import quantize, train
    assert set(quantize.SCHEMES) == set(SCHEMES) and set(train.SCHEMES) == {*SCHEMES, "none"}
