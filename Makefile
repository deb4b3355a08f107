# The two commands (README): `make demo` and `make test`. Each creates/refreshes .venv itself.
VENV      ?= .venv
PY        := $(VENV)/bin/python
TORCH     := torch==2.13.0
PYTEST_N  ?= 2
STAMP     := $(VENV)/.toylens-installed

.PHONY: venv demo test lint bench chromium clean

# torch first, pinned: with torch already installed, the project's torch range installs nothing
# more (an unpinned install would pull the newest CUDA build, several GB).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(STAMP)

# Train the seed experiment (no positional embedding, predict the previous token), then analyse it.
demo: venv
	@set -e; run_dir=$$($(VENV)/bin/toylens-train experiment=no_pos_prev_token | tail -n 1); \
	if [ -x $(VENV)/bin/toylens-analyze ] && $(PY) -c "import toylens.report.cli" 2>/dev/null; then \
	  $(VENV)/bin/toylens-analyze run=$$run_dir; \
	else echo "run directory: $$run_dir"; fi

# Headless Chromium for the report's browser test (Debian package), installed when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; the browser test will be skipped"; \
	  else echo "note: chromium not found and cannot be installed here; the browser test will be skipped"; fi; }

lint: venv
	$(VENV)/bin/ruff check toylens tests benchmarks

test: venv chromium lint
	$(PY) -m pytest -n $(PYTEST_N) -q --durations=15

bench: venv
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
