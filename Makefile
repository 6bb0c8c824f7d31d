# The README's two commands. Each sets up what is missing first (idempotent), then does its work.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-vllm setup-serve demo test clean

# The demo dataset too, so `accelerate launch -m axolotl.cli.train recipes/smollm2-135m/lora-cpu.yaml` works as is.
setup:
	@bash setup/install.sh --profile cpu
	@$(PY) -c "from training.demo import ensure_demo_data; ensure_demo_data()"

# vLLM for CPU in its own venv (~/.cache/loft/vllm/venv): `loft serve DIR --engine vllm` on a machine without a GPU.
setup-vllm:
	@bash setup/install_vllm.sh

# What the serving tests need beyond `make setup`: vLLM for CPU, llama-server's chat page, headless Chromium.
setup-serve: setup-vllm
	@bash setup/build_llama_ui.sh
	@bash setup/install_chromium.sh

demo: setup
	@$(VENV)/bin/loft demo

# Pytest exits 5 when it collects nothing: that must fail, never pass silently.
# The suite serves with the real vLLM and opens pages in a real browser, so those are part of what it sets up.
test: setup setup-serve
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf runs/ .pytest_cache
