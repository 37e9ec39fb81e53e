# The README's two commands. Each first installs whatever is missing, then runs:
#   make demo   the demo on its embedded default
#   make test   the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# Backends the suite must find built (a missing one is a test failure, not a skip).
EXPECT_BACKENDS ?= cpu

.PHONY: demo test install deps

# torch only where none is installed, so an existing (e.g. CUDA) build is never replaced;
# then the build tools that --no-build-isolation expects to find.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -q "setuptools>=64" wheel ninja

# Rebuild the extensions only when their sources or the build changed.
.build-stamp: setup.py pyproject.toml $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
	$(PIP) install --no-build-isolation -e ".[test]"
	@touch $@

install: deps .build-stamp

demo: install
	$(PYTHON) -m apsfast demo

# Triton kernels run on CPU tensors under the interpreter (set before triton is imported).
# One pytest worker per core (pytest-xdist), each with its share of the cores' threads.
TEST_WORKERS ?= auto
test: install
	APSFAST_EXPECT_BACKENDS="$(EXPECT_BACKENDS)" TRITON_INTERPRET=1 $(PYTHON) -m pytest -n $(TEST_WORKERS)
