# The two set-up commands of the README. Each creates .venv and installs what it needs first.
.PHONY: demo test bench

demo:  ## the main job: the whole loop on the embedded stack
	scripts/bootstrap.sh all
	.venv/bin/broadfast demo $(ARGS)

test:  ## the whole test suite (starts and stops its own broker and Redis)
	scripts/bootstrap.sh all,test
	.venv/bin/python -m pytest $(ARGS)

bench:  ## the replay benchmark (writes benchmarks/results/replay.md)
	scripts/bootstrap.sh all
	.venv/bin/python benchmarks/replay.py
