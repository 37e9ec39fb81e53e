# The README's two commands. Each first installs whatever is missing, then runs:
#   make demo   the demo on its embedded default
#   make test   the whole test suite
# and the documentation: `make docs` builds the site into site/ (--strict: a broken link, a
# missing page or an API name that no longer exists fails), `make docs-serve` serves it.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# The torchvision release paired with TORCH_VERSION, for the converter's zoo tests (optional:
# they skip without it). Installed only beside that torch, so that it never pulls another.
TORCHVISION_VERSION ?= 0.28.0
# Backends the suite must find built (a missing one is a test failure, not a skip).
EXPECT_BACKENDS ?= cpu

.PHONY: demo test docs docs-serve install deps zoo-deps

# torch only where none is installed, so an existing (e.g. CUDA) build is never replaced;
# then the build tools that --no-build-isolation expects to find.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -q "setuptools>=64" wheel ninja

# Rebuild the extensions only when their sources or the build changed.
.build-stamp: setup.py pyproject.toml $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)
	$(PIP) install --no-build-isolation -e ".[test,docs]"
	@touch $@

install: deps .build-stamp

# torchvision's and timm's model code for tests/test_zoo.py, beside the torch it pairs with.
zoo-deps:
	@if $(PYTHON) -c "import torch; raise SystemExit(not torch.__version__.startswith('$(TORCH_VERSION)'))"; then \
		$(PIP) install -q "torchvision==$(TORCHVISION_VERSION)" timm; \
	else echo "torch is not $(TORCH_VERSION): the zoo tests will skip"; fi

demo: install
	$(PYTHON) -m apsfast demo

# Triton kernels run on CPU tensors under the interpreter (set before triton is imported).
# One pytest worker per core (pytest-xdist), each with its share of the cores' threads.
TEST_WORKERS ?= auto
test: install zoo-deps
	APSFAST_EXPECT_BACKENDS="$(EXPECT_BACKENDS)" TRITON_INTERPRET=1 $(PYTHON) -m pytest -n $(TEST_WORKERS)

# The site's generated pages (the home page from the README, the configuration reference from
# the typed settings) import apsfast, hence the install.
DOCS_ENV := NO_MKDOCS_2_WARNING=1
docs: install
	$(DOCS_ENV) $(PYTHON) -m mkdocs build --strict

docs-serve: install
	$(DOCS_ENV) $(PYTHON) -m mkdocs serve
