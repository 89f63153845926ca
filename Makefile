# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, run the main job on the embedded default data
#   make test   create .venv, install with dev extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo test lint bench clean

setup: $(VENV)/.installed

# CPU torch first and pinned (an unpinned torch pulls several GB of CUDA packages), then the package with the
# dev extras (train + serve + test tools; a serving box needs only `pip install -c constraints.txt '.[serve]'`).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# Chromium for the search-page test (tests/serve/test_search_page.py), from Debian packages: only where apt-get
# exists, we are root and it is missing. Never fatal: without it that one test skips, saying why (the log).
browser: setup
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium (Debian package) for the search-page test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	      > $(VENV)/.chromium-install.log 2>&1 \
	      || echo "chromium could not be installed (see $(VENV)/.chromium-install.log)"; \
	  else \
	    echo "no apt-get or not root: chromium not installed" > $(VENV)/.chromium-install.log; \
	  fi; }

demo: setup
	$(BIN)/python jobs/demo.py

# two xdist workers; each test file (tests/serve, tests/export: each folder) runs whole on one, the longest first
# (the grouping scheduler and the order are in tests/conftest.py)
TEST_WORKERS ?= 2
test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder --durations=25

lint: setup
	$(BIN)/ruff check ccr_ray jobs export bench tests

bench: setup
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
