# The two commands of the README. Both set up .venv first (scripts/setup.sh skips what is done).
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup repro test bench

setup:
	@bash scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest

bench: setup
	python bench/tokenize_stage.py
