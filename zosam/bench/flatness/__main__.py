"""``python -m zosam.bench.flatness``: the same as ``zosam bench flatness``."""

from zosam.bench.flatness import main

main()
