.PHONY: demo test bench deps

# The main job: management (embedded IdP, SQLite), one peer, a first SSH login.
demo:
	scripts/demo.sh

# The whole test suite, installing what it needs first.
test:
	scripts/test.sh

bench:
	scripts/bench.sh

deps:
	scripts/install-deps.sh
