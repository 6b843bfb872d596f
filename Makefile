.PHONY: setup run test test-latest lint lock
# make run / make test install every dependency from requirements.lock into .venv.
setup:
	@scripts/setup.sh
run: setup
	.venv/bin/tandem serve
test: setup
	.venv/bin/python -m pytest -q
# The newest releases pyproject.toml allows, in .venv-latest.
test-latest:
	@scripts/setup.sh latest
	.venv-latest/bin/python -m pytest -q
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
# Refresh requirements.lock (needs uv).
lock:
	scripts/lock.sh
