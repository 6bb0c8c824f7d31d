# The README's two commands. Each sets up what is missing first (idempotent), then does its work.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

# The demo dataset too, so `accelerate launch -m axolotl.cli.train recipes/smollm2-135m/lora-cpu.yaml` works as is.
setup:
	@bash setup/install.sh --profile cpu
	@$(PY) -c "from training.demo import ensure_demo_data; ensure_demo_data()"

demo: setup
	@$(VENV)/bin/loft demo

# Pytest exits 5 when it collects nothing: that must fail, never pass silently.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf runs/ .pytest_cache
