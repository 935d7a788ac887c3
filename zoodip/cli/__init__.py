"""`zoodip` command line: a lazy click group; each stage's command lives in its own module here (train.py, ...).

Commands import their stage lazily so `zoodip --help` stays fast and never imports torch.
"""
from __future__ import annotations

import importlib
import os
import warnings

import click

# command name -> "module:attribute"; modules are imported only when the command runs.
COMMANDS = {
    "providers": "zoodip.cli.providers:providers",
    "verify": "zoodip.cli.providers:verify",
    "replica": "zoodip.cli.export:replica",
    "export": "zoodip.cli.export:export",
    "quantize": "zoodip.cli.quantize:quantize",
    "train": "zoodip.cli.train:train",
    "personalize": "zoodip.cli.train:personalize",
    "train-many": "zoodip.cli.cluster:train_many",
    "generate": "zoodip.cli.generate:generate",
    "evaluate": "zoodip.cli.generate:evaluate",
    "export-metrics": "zoodip.cli.generate:export_metrics",
}
HELP = {
    "providers": "Show onnxruntime, its execution providers, and what --provider auto picks.",
    "verify": "Check a model folder's files against the sha256 its manifest recorded.",
    "replica": "Write a random-weight SD 1.5 / SD 2.1 / SDXL architecture replica (benchmarks only).",
    "export": "Export a diffusers SD 1.x / 2.x / XL model to zoodip's ONNX layout.",
    "quantize": "Quantize an exported model (w8, w8-fast, w4, w8a8, fp16) with fidelity gates.",
    "train": "Learn a token embedding with zeroth-order textual inversion (torch-free).",
    "personalize": "One command: export, quantize, train and sample, reusing finished stages.",
    "train-many": "Train many subjects (a JSONL of jobs) across Ray workers, resumable.",
    "generate": "Generate images with learned tokens (torch-free).",
    "evaluate": "DreamBooth-protocol evaluation of a learned token.",
    "export-metrics": "Export CLIP / DINO metric models to ONNX.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            if ctx.resilient_parsing or ctx.info_name is None:
                return None
            # A stage not built yet (or a missing extra) says so instead of a traceback.
            return click.Command(name, help=HELP[name], callback=_unavailable(name, err))

    def format_commands(self, ctx, formatter):
        # Help text from HELP so listing commands imports nothing.
        with formatter.section("Commands"):
            formatter.write_dl([(n, HELP[n]) for n in self.list_commands(ctx)])


def _unavailable(name, err):
    def run():
        raise click.ClickException(f"`zoodip {name}` is unavailable: {err}")
    return run


def _one_line(message, category, filename, lineno, file=None, line=None) -> str:
    """Library warnings as one plain line (they name the problem and the fix), not a source excerpt."""
    return f"warning: {message}\n"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zoodip")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: ZOODIP_DEBUG=1).")
def main(debug):
    """zoodip: personalize a quantized Stable Diffusion with forward passes only (ZOODiP)."""
    warnings.formatwarning = _one_line
    if debug:
        os.environ["ZOODIP_DEBUG"] = "1"
