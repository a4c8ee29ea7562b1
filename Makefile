# Two commands do everything: `make run` (the app on the embedded offline model) and
# `make test` (the whole suite). Both create .venv and install the pinned requirements first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PORT    ?= 8501
# Where the server listens. Localhost only by default: nobody else on the network can reach it.
# `make run HOST=0.0.0.0` opens it to the LAN (anyone who can reach the port can use the app,
# unless sign-in is on: see docs/deploy.md).
HOST    ?= 127.0.0.1
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt scripts/install.sh | cksum | cut -d' ' -f1)

.PHONY: run demo test setup bench clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt scripts/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	scripts/install.sh $(PY)
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	@echo "Starting the probing dashboard at http://$(HOST):$(PORT) (embedded offline model; first start converts it, ~30 s)"
	@if [ "$(HOST)" != "127.0.0.1" ] && [ "$(HOST)" != "localhost" ]; then echo "Listening on $(HOST): anyone who can reach this port can use the app (see docs/deploy.md for sign-in)"; fi
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT)

# Demo mode: capped inputs, the embedded model, a plain-language explanation on every page. The launcher
# starts building the example cache entry at once (its own process; Home shows its progress), then runs Streamlit.
demo: setup
	@echo "Starting the probing dashboard in demo mode at http://$(HOST):$(PORT) (the example starts building now)"
	PROBING_DEMO=1 $(PY) -m probing_core.store.background serve -- $(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; PYTHONPATH=. $(PY) $$b || exit 1; done

clean-cache:
	rm -rf cache .test-cache
