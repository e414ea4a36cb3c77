# Quick start:  make run   (set up, then the end-to-end demo: the shipped model speaks held-out
#                           sentences in a held-out voice, then says $(SAY) in that voice
#                           from text alone; output in soundstorm-demo/)
#               make test  (set up, then run the test suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup run test bench gpu-check clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@# espeak-ng speaks the demo's and the tests' speech; without it the demo stops saying
	@# how to install it, and the speech tests are skipped (with a reason).
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; } \
		|| echo "note: espeak-ng is not installed; the speech tests will be skipped"
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: letting the resolver pick torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The sentence `make run` ends with, in the demo's held-out voice: change it with
#   make run SAY="Any sentence you like."
SAY ?= Clara carried the golden lantern across the river this morning.

run: setup
	$(VENV)/bin/soundstorm demo --out soundstorm-demo
	$(VENV)/bin/soundstorm say "$(SAY)" --voice soundstorm-demo/prompt.wav \
		--out soundstorm-demo/say.wav --threads 1

# The pytest script, not `python -m pytest`: that would put the checkout itself on sys.path,
# where its folders (kernels/, engine/) would shadow packages of the same names.
test: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(VENV)/bin/soundstorm bench --preset small --seconds 10
	$(PY) bench/op_costs.py
	$(PY) bench/bench_ops.py

# On a CUDA machine that already has a CUDA build of torch (no network needed): installs this
# checkout without dependencies into that Python and runs the GPU acceptance checks.
gpu-check:
	$(PYTHON) bench/gpu_check.py --out gpu-check.json

clean:
	rm -rf $(VENV) build kernels/_C*.so *.egg-info soundstorm-out soundstorm-demo .pytest_cache
