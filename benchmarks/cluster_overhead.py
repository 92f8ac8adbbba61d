"""Ray scheduling overhead per trial on 1 vs 3 nodes (see ``zosam.bench.cluster_overhead``).

Usage: ``python benchmarks/cluster_overhead.py --help``.
"""

from zosam.bench.cluster_overhead import main

if __name__ == "__main__":
    main()
