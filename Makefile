# The targets people expect; each sets the machine up first (deploy/setup.sh is idempotent).
.PHONY: setup run test lint bench clean

setup:
	bash deploy/setup.sh

run: setup
	.venv/bin/ipferry run

test: setup
	.venv/bin/ruff check . && .venv/bin/lint-imports && .venv/bin/mypy && .venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check . && .venv/bin/lint-imports && .venv/bin/mypy

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis .ruff_cache .mypy_cache

# ipferry against pasta, slirp4netns and veth (about 15 minutes; BENCH_ARGS=--quick for a smoke
# test), then start-up time and memory.
bench: setup
	bench/run $(BENCH_ARGS)
	.venv/bin/python bench/startup.py
