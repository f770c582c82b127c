# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs featcache with its test extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m featcache demo

test: $(STAMP) chromium
	$(PY) -m pytest -q -p no:cacheprovider

# The report test renders pages in a real browser: install Debian's chromium when it is missing
# (root; a no-op once installed). Without it the test skips, except under CI=true, where it fails.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium is missing: sudo apt-get install -y chromium (the browser test skips without it)"; fi; }

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not real and not slow"

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) cache/*.h5 cache/*.partial cache/*.lock runs demo-out
