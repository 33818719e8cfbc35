# Two commands: `make demo` (plan + train the built-in example) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUILD ?= build
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dlrm-plan --tables examples/demo/tables.json --topology examples/demo/topology.json \
		-o $(BUILD)/demo/plan.json
	$(BIN)/dlrm-run --plan $(BUILD)/demo/plan.json --tables examples/demo/tables.json \
		--steps 1500 --batch-size 256 --threads 1 --metrics-log $(BUILD)/demo/metrics.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(BUILD) $(VENV)
