# The two commands of the README. Both set up whatever is missing first and are safe to re-run.
SHELL := /bin/bash
PY := .venv/bin/python
CW := .venv/bin/codeworld
DEMO_DIR ?= runs/demo

.PHONY: demo test test-chaos setup services-test bench

setup:
	@bash deploy/setup/venv.sh
	@bash deploy/setup/services.sh redis

services-test: setup
	@bash deploy/setup/services.sh docker
	@bash deploy/setup/services.sh chromium
	@bash deploy/setup/services.sh registry
	@$(CW) sandbox build-image --if-missing
	@bash deploy/local/cluster.sh image

# Tiny model -> short supervised warm start -> async RL; see examples/demo.yaml.
demo: setup
	@$(CW) model init-tiny $(DEMO_DIR)/init --seed 0
	@$(CW) sft examples/demo_sft.yaml --model $(DEMO_DIR)/init --out $(DEMO_DIR)/sft
	@$(CW) train examples/demo.yaml model.path=$(DEMO_DIR)/sft run.dir=$(DEMO_DIR)

test: services-test
	@$(PY) -m pytest $(PYTEST_ARGS)

# Real runs with one part killed mid-run each (about 12 minutes on an idle 2-core machine); kept out of `make test`.
test-chaos: services-test
	@$(PY) -m pytest -m chaos tests/e2e/test_chaos.py $(PYTEST_ARGS)

bench: setup
	@$(PY) bench/pipeline.py
