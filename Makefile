# lms — two commands do everything on a fresh machine:
#   make demo   install, fetch SmolLM2-135M-Instruct, start lmsd, load it with a TTL, show `lms ps`
#   make test   install, then run the whole test suite
#
# The virtualenv and the llama-cpp-python wheel (built from source, ~5 min on 2 cores) live outside the
# repo, in $(LMS_DEV_CACHE), and are reused by every later run and every clone on this machine.

LMS_DEV_CACHE ?= $(HOME)/.cache/lms-dev
VENV ?= $(LMS_DEV_CACHE)/venv
WHEELS := $(LMS_DEV_CACHE)/wheels
PY := $(VENV)/bin/python
LMS := $(VENV)/bin/lms
DEPS_STAMP := $(VENV)/.deps-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
export LMS_TEST_CACHE ?= $(LMS_DEV_CACHE)/test-assets
PYTEST_ARGS ?=
# setuptools warns on every editable install that a folder named like the package takes precedence: true, and
# exactly what a checkout wants. A new user's `make demo` shows no build-tool warnings.
QUIET_BUILD := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: install demo test unit stress lint protos bench clean-venv

install: $(DEPS_STAMP)
	@# The venv is shared by clones: point its editable install at this checkout when it points elsewhere.
	@# -P: without the current folder on sys.path, so the check sees what the installed scripts see.
	@$(PY) -P -c "import lmsd,sys; sys.exit(0 if lmsd.__file__.startswith('$(CURDIR)/') else 1)" 2>/dev/null || \
		$(QUIET_BUILD) $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

$(DEPS_STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@mkdir -p $(WHEELS)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || { \
		echo "building llama-cpp-python $(LLAMA_VERSION) from source (once; about 5 minutes on 2 cores)"; \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip wheel --quiet --no-deps \
			-w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION); }
	$(QUIET_BUILD) $(PY) -m pip install --quiet --find-links $(WHEELS) -c constraints.txt -e '.[dev,bench]'
	@rm -f $(VENV)/.deps-*
	@touch $@

demo: install
	@LMS=$(LMS) bash scripts/demo.sh

test: install
	@$(PY) -m pytest --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The slow sizes: the scheduler's state machine with many more examples, the slow tier (load, soak, faults,
# fuzz) at full size writing its figures into docs/reliability.md, and the contention benchmark.
stress: install
	HYPOTHESIS_PROFILE=stress $(PY) -m pytest tests/unit/test_scheduler_machine.py $(PYTEST_ARGS)
	$(PY) bench/reliability.py
	$(PY) bench/bench_contention.py

lint: install
	$(VENV)/bin/ruff check lmsd lmscli tests scripts bench
	$(VENV)/bin/mypy lmsd lmscli

# The benchmarks (docs/performance.md): bench_http.py (HTTP overhead, cold start), then bench_batching.py (lmsd
# against in-process llama-cpp-python, llama_cpp.server and llama-server: single stream, 1-8 concurrent clients,
# prompt cache). llama-server is measured when `make llama-server` has built it. `make bench BENCH_ARGS=--quick`
# is a smoke run of the second.
BENCH_ARGS ?=
bench: install
	$(PY) bench/bench_http.py
	$(PY) bench/bench_batching.py --llama-server $(LMS_DEV_CACHE)/llama-server/$(LLAMA_VERSION)/llama-server $(BENCH_ARGS)
	$(PY) bench/bench_catalog.py
	$(PY) bench/bench_cli.py

# llama.cpp's llama-server from the llama.cpp that the pinned llama-cpp-python vendors, for `make bench`: built
# once (20-25 minutes on 2 cores, under nice) into $(LMS_DEV_CACHE)/llama-server/$(LLAMA_VERSION)/, outside the repo.
.PHONY: llama-server
llama-server: install
	@LMS_DEV_CACHE=$(LMS_DEV_CACHE) PY=$(PY) bash scripts/build_llama_server.sh $(LLAMA_VERSION)

protos: install
	$(PY) scripts/gen_protos.py

clean-venv:
	rm -rf $(VENV)
