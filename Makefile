# The two set-up commands the README names: `make demo` (main job) and `make test` (test suite).
# torch is pinned to the local CPU wheel on these machines; the package itself asks for a normal range.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo_output

.PHONY: install demo test

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_PIN)"
	$(PYTHON) -m pip install --quiet -e ".[train,dev]"

demo: install
	efficientvlm demo --output $(DEMO_DIR)

test: install
	$(PYTHON) -m pytest tests
