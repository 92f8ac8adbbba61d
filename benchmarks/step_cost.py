"""Step cost of SGD, SAM and ZO-SAM: see ``zosam.bench.step_cost`` (``zosam bench step-cost``)."""

from zosam.bench.step_cost import main

if __name__ == "__main__":
    main()
