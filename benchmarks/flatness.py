"""See ``zosam.bench.flatness`` (``zosam bench flatness``)."""

from zosam.bench.flatness import main

if __name__ == "__main__":
    main()
