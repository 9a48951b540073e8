# Two commands do all the set-up on a fresh machine:
#   make demo   — create .venv if missing, install, run the README's quick start exactly as written
#   make test   — create .venv if missing, install dev requirements, run the whole test suite
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEVSTAMP:= $(VENV)/.installed-dev

.PHONY: demo test test-long venv install install-dev clean-demo

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

$(DEVSTAMP): requirements-dev.txt requirements.txt pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP) $@

install: $(STAMP)
install-dev: $(DEVSTAMP)

demo: $(STAMP)
	$(VPY) utils/demo.py

test: $(DEVSTAMP)
	$(VPY) -m pytest -q -m "not long"

# the README's step-by-step walk, every command as written, and MMLU parity with lm-eval on the
# whole val split (about 55 minutes on 2 cores; CI runs it after make test, in the time left)
test-long: $(DEVSTAMP)
	$(VPY) -m pytest -q -m long

clean-demo:
	rm -rf runs/classic/deepseek/v3_nano
