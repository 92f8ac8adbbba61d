"""See ``zosam.bench.robustness`` (``zosam bench robustness``)."""

from zosam.bench.robustness import main

if __name__ == "__main__":
    main()
