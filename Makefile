# The targets people expect; each sets the machine up first (deploy/setup.sh is idempotent).
.PHONY: setup run test lint bench bench-http clean

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

# HTTP req/s and latency (wrk) direct, through ipferry (splice, HTTP layer, HTTP on-ramp), squid
# and nginx; installs wrk, nginx, squid if missing (about 8 minutes; BENCH_ARGS=--quick).
bench-http: setup
	.venv/bin/python bench/httpbench.py $(BENCH_ARGS)
