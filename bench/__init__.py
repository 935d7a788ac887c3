"""Benchmarks and analyses (run from a checkout; not installed). See bench/README.md for every command.

    bench/common.py      process isolation, RSS sampling, JSON results (shared by all)
    bench/torch_ti.py    the PyTorch Textual Inversion reference (diffusers' script recipe)
    bench/sd/            SD-scale memory and speed on replicas (bench.sd.memory, bench.sd.speed, ...)
    bench/toy/           toy-world quality against backprop TI (bench.toy.quality, bench.toy.pool, ...)
    bench/analysis/      where the gradient lives (bench.analysis.grad_spectrum, bench.analysis.split)
"""
