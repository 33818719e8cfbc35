# Two commands: `make demo` (plan + train the built-in example) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUILD ?= build
STAMP := $(VENV)/.installed
TORCHREC_STAMP := $(VENV)/.torchrec-installed

.PHONY: demo test install install-torchrec clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# TorchRec and fbgemm-gpu-cpu for `dlrm-plan export` checks against DistributedModelParallel
# (tests/dlrm_runtime/test_torchrec_dmp.py). torchrec goes in with --no-deps: it requires
# fbgemm-gpu, whose CUDA build the CPU one replaces. About 9 MB of wheels.
install-torchrec: $(TORCHREC_STAMP)

$(TORCHREC_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,torchrec]'
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps torchrec==1.8.0
	touch $(TORCHREC_STAMP)

demo: $(STAMP)
	$(BIN)/dlrm-plan --tables examples/demo/tables.json --topology examples/demo/topology.json \
		-o $(BUILD)/demo/plan.json
	$(BIN)/dlrm-run --plan $(BUILD)/demo/plan.json --tables examples/demo/tables.json \
		--steps 1500 --batch-size 256 --threads 1 --metrics-log $(BUILD)/demo/metrics.jsonl

test: $(STAMP) $(TORCHREC_STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(BUILD) $(VENV)
