"""Sparse-training overhead benchmark (see ``zosam.bench.sparse_overhead``).

Usage: ``python benchmarks/sparse_overhead.py [--densities 0.1 0.02] [--batch-size 64]``.
"""

from zosam.bench.sparse_overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
