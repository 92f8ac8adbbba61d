"""Data loading vs training step time: see ``zosam.bench.data_speed``."""

from zosam.bench.data_speed import main

if __name__ == "__main__":
    main()
