# The two commands (see README): `make run` and `make test`. Both install what is missing first.
PYTHON ?= python3
ARGS ?= variant=diff_attn

.PHONY: run test install install-test

run: install
	$(PYTHON) -m flashlight.run $(ARGS)

test: install-test
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q

install:
	PYTHON=$(PYTHON) scripts/install.sh

install-test:
	PYTHON=$(PYTHON) scripts/install.sh test
