# DAS Serve: every set-up step lives here, so a fresh machine needs only `make serve` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on local disk; a GPU host overrides, e.g.
#   make serve TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test serve bento plans plans-meter plans-llava bench bench-runtime gpu-check loadtest loadtest-hotswap clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sed -e 's|$$(TORCH_SPEC)|$(TORCH_SPEC)|' -e 's|$$(HOST)|$(HOST)|' -e 's|$$(PORT)|$(PORT)|' \
	  | awk -F'\t' '{ printf "  %-17s %s\n", $$1, $$2 }'

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install torch ($(TORCH_SPEC)) and the project

# promtool (Debian's prometheus package) checks the /metrics output in the tests; best effort.
TOOLS := $(VENV)/.tools
$(TOOLS): | $(STAMP)
	@command -v promtool >/dev/null || { command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
	  >/dev/null 2>&1; } || echo "note: promtool could not be installed; its check will be skipped"
	touch $(TOOLS)

test: $(STAMP) $(TOOLS)  ## run the test suite
	$(VENV)/bin/pytest -q

# localhost only unless asked: HOST=0.0.0.0 exposes the service (the admin API needs DAS_ADMIN_TOKEN anyway)
HOST ?= 127.0.0.1
PORT ?= 3000
serve: $(STAMP)  ## serve the embedded default on $(HOST):$(PORT) (HOST=0.0.0.0 to expose it, PORT=... to move it)
	HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=true $(VENV)/bin/bentoml serve service.service:DASService --host $(HOST) --port $(PORT)

# The Bento pins the venv's torch build: 2.13.0+cpu comes from PyTorch's CPU wheel index, a plain
# 2.13.0 from PyPI (there the CUDA build). TORCH_BUILD=2.13.0+cu130 picks another build, TORCH_INDEX
# a mirror; BENTO_LOCK=0 skips BentoML's lock step (it needs the indexes online). docs/deploy.md
TORCH_BUILD ?= $(shell $(PY) -c 'import torch; print(torch.__version__)' 2>/dev/null)
TORCH_INDEX ?=
BENTO_LOCK ?= 1
bento: $(STAMP)  ## build the Bento (das-serve) with torch pinned to the venv's build (TORCH_BUILD, TORCH_INDEX to change it)
	$(PY) deploy/bento/bentofile.py --torch "$(TORCH_BUILD)" $(if $(TORCH_INDEX),--index "$(TORCH_INDEX)") \
	  $(if $(filter 0,$(BENTO_LOCK)),--no-lock) --out build/bentofile.yaml
	HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=true $(VENV)/bin/bentoml build -f build/bentofile.yaml .

plans: $(STAMP)  ## regenerate the embedded default (data, backbone, search, plans; about 3.3 h on 2 cores, resumable)
	$(VENV)/bin/das pipeline --out plans --work build/pipeline --force

plans-meter: $(STAMP)  ## regenerate the tiny METER and its plans in plans/meter/ (about 2.2 h on 2 cores, resumable)
	$(VENV)/bin/das pipeline --arch meter --out plans/meter --work build/pipeline-meter --force

# resumable: every step's result stays in build/llava and is reused (LLAVA_FRESH=1 starts over)
LLAVA_FRESH ?=
plans-llava: $(STAMP)  ## regenerate the tiny generative LLaVA and its plans in plans/llava/ (~60 min on 2 cores, resumable)
	$(PY) -m models.cli.main llava pipeline --out plans/llava --work build/llava $(if $(LLAVA_FRESH),--fresh)

bench-runtime: $(STAMP)  ## model-level latency vs FLOPs benchmark (ViLT-B/32 size, random init)
	$(VENV)/bin/das bench --out bench-results

# make bench BENCH_SHORT=1: a quick run (fewer repeats, shorter load levels); BENCH_DEVICE / BENCH_DTYPE
# choose the hardware, e.g. make bench BENCH_DEVICE=cuda BENCH_DTYPE=float16; BENCH_THREADS=N sets the
# torch threads everywhere (default: torch's choice, one per core, as make serve runs)
BENCH_SHORT ?=
BENCH_DEVICE ?= auto
BENCH_DTYPE ?= float32
BENCH_THREADS ?=
BENCH_ON := --device $(BENCH_DEVICE) --dtype $(BENCH_DTYPE) $(if $(BENCH_THREADS),--threads $(BENCH_THREADS))
# the service level runs twice: at ViLT-B/32 size (random init; the model dominates a request, as in
# production; BENCH_SERVICE_BASE= to leave it out) and on the embedded default (fixed costs dominate)
BENCH_SERVICE_BASE ?= 1
# its load: 2, 4 and 8 clients, 5 paired rounds of 15 s (a round counts 70-150 requests, so its ratios move
# in steps of 1-3%; commas would split a $(if ...), hence variables)
BASE_LOAD := --concurrency 2,4,8 --rounds 5 --duration 15 --warmup 2
BASE_LOAD_SHORT := --short --concurrency 4,8
bench: $(STAMP)  ## every benchmark in one run: model level (ViLT-B/32 size + embedded), generation (LaVIN ~1B), service level vs a plain BentoML service (both sizes), HTTP overhead, producer throughput -> bench-results/
	$(VENV)/bin/das bench --out bench-results $(BENCH_ON) $(if $(BENCH_SHORT),--repeats 2 --warmup 0 --extra-rounds 0)
	$(VENV)/bin/das bench --size embedded --out bench-results $(BENCH_ON) $(if $(BENCH_SHORT),--repeats 5 --warmup 1 --extra-rounds 0)
	$(VENV)/bin/das bench --generation --out bench-results $(BENCH_ON) $(if $(BENCH_SHORT),--short)
	if [ -n "$(BENCH_SERVICE_BASE)" ]; then $(VENV)/bin/python loadtests/bench_service.py --model base \
	  --skip-layers 4,6 --out bench-results/service-base $(BENCH_ON) $(if $(BENCH_SHORT),$(BASE_LOAD_SHORT),$(BASE_LOAD)); fi
	$(VENV)/bin/python loadtests/bench_service.py --out bench-results $(BENCH_ON) $(if $(BENCH_SHORT),--short) \
	  --model-results bench-results/bench-runtime.json bench-results/bench-runtime-embedded.json \
	  $(if $(BENCH_SERVICE_BASE),--service-results bench-results/service-base/bench-service.json)
	$(VENV)/bin/das bench --producer --out bench-results $(BENCH_ON) $(if $(BENCH_SHORT),--short)

# make gpu-check (scripts/gpu_check.sh; --dry-run checks the set-up without a GPU): the CUDA-marked tests
# (pytest -m cuda) and make bench BENCH_DEVICE=cuda BENCH_DTYPE=float16 BENCH_SHORT=1, in under 8 minutes
gpu-check: $(STAMP)  ## on a GPU host: the CUDA tests + a short CUDA bench (< 8 min) -> build/gpu-check/summary.md
	VENV=$(VENV) scripts/gpu_check.sh --out build/gpu-check

# Load tests (loadtests/README.md): bounded and localhost only; reports go to loadtests/results/.
#   make loadtest USERS=8 SPAWN_RATE=4 DURATION=1m      make loadtest-hotswap SWAPS=20
USERS ?= 6
SPAWN_RATE ?= 2
DURATION ?= 30s
SWAPS ?= 50
HOTSWAP_USERS ?= 4
loadtest: $(STAMP)  ## Locust load on every endpoint of the embedded default (USERS, SPAWN_RATE, DURATION) -> loadtests/results/
	$(PY) -m loadtests.run --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION)

loadtest-hotswap: $(STAMP)  ## plans loaded/activated/rolled back/unloaded under load (SWAPS); fails on errors, stale versions, memory growth
	$(PY) -m loadtests.hotswap --swaps $(SWAPS) --users $(HOTSWAP_USERS)

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info
