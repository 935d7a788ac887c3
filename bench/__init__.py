"""Benchmarks: memory and speed of zoodip training against a PyTorch Textual Inversion reference.

    python -m bench.memory --resolution 512 --out bench/results/memory_512.json
    python -m bench.speed --out bench/results/speed.json
    python -m bench.plot bench/results/memory_512.json --png bench/results/memory_512.png

Each contender of bench.memory runs in its own fresh subprocess so that its peak RSS is its own.
"""
