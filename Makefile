# gridloop — the closed loop of urban incidents (一网统管) over Apache Kafka.
#   make demo    run the whole system with a simulation of Gaohang town
#   make test    run every test against a real Kafka broker
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV      ?= uv
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.synced
KAFKA   := infra/kafka/kafka.sh
PYTEST_ARGS ?=
# `make test` runs everything, the small chaos run (150 incidents, each worker and the broker killed once) and the
# API fuzzing with FUZZ_EXAMPLES examples per operation and mode included; `make chaos` and `make fuzz` (200
# examples) are the long versions.
FUZZ_EXAMPLES ?= 10
# `make bench-read` rebuilds and reads the operations center on N incidents of synthetic history (a year of them).
N ?= 20000

.PHONY: help venv lint fmt schemas kafka-up kafka-down kafka-status kafka-reset topics test test-unit demo run \
	chaos chaos-small bench bench-read soak fuzz clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml uv.lock
	@command -v $(UV) >/dev/null || python3 -m pip install --quiet uv
	$(UV) sync --frozen --python 3.11
	@touch $@

venv: $(STAMP) ## create/update the virtualenv from uv.lock

lint: $(STAMP) ## ruff + mypy
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy

fmt: $(STAMP) ## format the code
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

schemas: $(STAMP) ## re-export the JSON Schema files from the event models
	$(PY) -m schemas.export

kafka-up: ## start the single-node KRaft broker (reused if running)
	@bash $(KAFKA) up

kafka-down: ## stop the broker
	@bash $(KAFKA) down

kafka-status: ## is the broker up?
	@bash $(KAFKA) status

kafka-reset: ## stop the broker and delete its data
	@bash $(KAFKA) reset

topics: $(STAMP) kafka-up ## create the catalog's topics (idempotent)
	$(PY) -m services.admin topics create

test: $(STAMP) topics ## every test, over the real broker
	$(PY) -m schemas.export --check
	GRIDLOOP_FUZZ_EXAMPLES=$${GRIDLOOP_FUZZ_EXAMPLES:-$(FUZZ_EXAMPLES)} \
		$(UV) run --frozen pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## tests that need no broker
	$(UV) run --frozen pytest tests/unit $(PYTEST_ARGS)

demo: $(STAMP) topics ## run every service and a simulation of Gaohang town; ends with a table per department
	$(PY) -m services.simulator demo $(DEMO_ARGS)

run: $(STAMP) topics ## run every service in the foreground (Ctrl-C stops them)
	$(PY) -m services.supervisor

chaos: $(STAMP) ## kill services and the broker under load; audit that nothing is lost or done twice
	$(PY) -m services.chaos run $(CHAOS_ARGS)

chaos-small: $(STAMP) ## the small chaos run as a test (150 incidents, one kill each)
	$(UV) run --frozen pytest tests/integration/test_chaos_small.py --timeout=1800 $(PYTEST_ARGS)

bench: $(STAMP) kafka-up ## incidents closed per second beside the raw Kafka limit (JSON on the last line)
	$(PY) -m services.bench run $(BENCH_ARGS)

bench-read: $(STAMP) kafka-up ## the read side on N incidents of history: rebuild, every read, live lag (JSON last)
	$(PY) -m services.bench read --incidents $(N) $(BENCH_READ_ARGS)

soak: $(STAMP) kafka-up ## 30 minutes at half the maximum rate; RSS growth per service
	$(PY) -m services.bench soak $(SOAK_ARGS)

fuzz: $(STAMP) topics ## schemathesis against every service's OpenAPI, 200 examples per operation
	GRIDLOOP_FUZZ_EXAMPLES=$${GRIDLOOP_FUZZ_EXAMPLES:-200} $(UV) run --frozen pytest tests/e2e/test_fuzz.py --timeout=3600 $(PYTEST_ARGS)

clean: ## stop the broker, delete var/ and caches (keeps .venv and the Kafka jars)
	-@bash $(KAFKA) down
	-@bash infra/postgres/pg.sh down
	rm -rf var .pytest_cache .mypy_cache .ruff_cache artifacts
