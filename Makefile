# The README's two commands: `make app` and `make test`. Both set everything up first (fast when done).
PY := .venv/bin/python

.PHONY: app test test-fast lint bench bench-app setup

setup:
	@scripts/setup.sh

app: setup
	$(PY) -m streamlit run app.py

# The whole suite, slow tests on the real packaged models and browser tests included.
test:
	@scripts/setup.sh --browser
	$(PY) -m ruff check .
	@$(PY) -m pytest --durations=30; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$status

# Everything but the slow tests (seconds to a minute).
test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports --no-logo
	$(PY) -m mypy embviz

bench: setup
	$(PY) -m embviz.cli bench --json

# The app itself in headless Chromium (not part of `make bench`): every page, a new rank, a cold UMAP.
bench-app:
	@scripts/setup.sh --browser
	$(PY) -m embviz.cli bench --stages app --json
