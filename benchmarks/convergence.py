"""See ``zosam.bench.convergence`` (``zosam bench convergence``)."""

from zosam.bench.convergence import main

if __name__ == "__main__":
    main()
