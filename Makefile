.PHONY: setup run test lint
setup:
	@scripts/setup.sh
run: setup
	.venv/bin/tandem serve
test: setup
	.venv/bin/python -m pytest -q
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
