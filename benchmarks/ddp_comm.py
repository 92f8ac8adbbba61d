"""Bytes all-reduced per step under DDP, SGD vs SAM vs ZO-SAM (see ``zosam.bench.ddp_comm``).

Usage: ``python benchmarks/ddp_comm.py --help``.
"""

from zosam.bench.ddp_comm import main

if __name__ == "__main__":
    main()
