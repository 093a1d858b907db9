# The targets people expect; each sets the machine up first (deploy/setup.sh is idempotent).
.PHONY: setup run test lint bench clean

setup:
	bash deploy/setup.sh

run: setup
	.venv/bin/ipferry run

test: setup
	.venv/bin/ruff check . && .venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis .ruff_cache

bench: setup
	.venv/bin/python bench/startup.py
	.venv/bin/python bench/throughput.py
