"""See ``zosam.bench.accuracy`` (``zosam bench accuracy``)."""

from zosam.bench.accuracy import main

if __name__ == "__main__":
    main()
