# The README's two commands: `make demo` and `make test`. Each sets up .venv from scratch
# when needed (torch from the machine's local files, see ../shared/docs/stack.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every Ray started here binds to 127.0.0.1 only (stack.md, "Loopback only").
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test lint setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The quick sweep (tune/quick.yaml), a new one each time (its own Ray experiment and MLflow
# parent run), so it can be rerun. Without the CIFAR-10 JPEG archive ($ZOSAM_CIFAR10_JPEG or
# ../shared/data/cifar10-jpeg.tar.gz) it says where it looked and runs on the bundled digits.
demo: $(STAMP)
	$(BIN)/zosam demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check .
