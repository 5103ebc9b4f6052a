.PHONY: demo test bench deps install

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

# A server install (as root): /opt/meshsshd, /usr/local/bin, the units; DESTDIR=DIR below DIR.
install:
	scripts/install-service.sh $(if $(DESTDIR),--root $(DESTDIR))
