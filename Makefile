# The two commands of the README:
#   make book   -> builds book/_build/html/index.html from the bundled data, executing every notebook once
#   make test   -> unit tests, every notebook through papermill (CI parameters), the book and browser tests
# Both create .venv and install what they need on a fresh machine (Python 3.11, pip, Node 20).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
MODE    ?= full

.PHONY: book test setup browser-deps vendor clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,book,bench]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (prot_lib)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# npm ci of the pinned widget/MathJax/require.js files, copied with their licences into book/_vendor
vendor: setup
	$(PY) scripts/build_book.py --vendor-only

browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

book: setup
	$(PY) scripts/build_book.py --mode $(MODE)

test: setup vendor browser-deps
	$(PY) -m pytest -ra

clean:
	rm -rf book/_build book/chapters runs lightning_logs
