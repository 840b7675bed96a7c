# Set-up and entry points. `make demo` and `make test` each build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On a machine without an NVIDIA GPU take PyTorch's CPU build (on this kind of machine
# `torch==2.13.0` is a CPU wheel on local disk); a bare `torch` would pull a multi-GB CUDA
# build. Override with `make TORCH='torch==X' ...`.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4' || echo 'torch==2.13.0')

.PHONY: demo test quick lint clean zbar

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

# pyzbar needs the system library libzbar; install it where we can (Debian, as root).
zbar:
	@ldconfig -p 2>/dev/null | grep -q libzbar || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q libzbar0 >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q libzbar0 >/dev/null)) || \
	    echo "warning: could not install libzbar0; QR image cross-checks will be skipped" >&2; \
	  else echo "note: libzbar0 is not installed; QR image cross-checks will be skipped" >&2; fi; }

demo: $(BIN)/.installed
	$(BIN)/ticketctl demo

test: $(BIN)/.installed zbar
	$(BIN)/ruff check ticketctl tests benchmarks fixtures
	$(BIN)/python -m pytest -q

# The quick loop: everything but the end-to-end runs in subprocesses (marked slow).
quick: $(BIN)/.installed zbar
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check ticketctl tests benchmarks fixtures

clean:
	rm -rf $(VENV) runs .pytest_cache
