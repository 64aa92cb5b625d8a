# Two set-up commands for a newcomer: `make demo` and `make test`. Each creates .venv if missing
# and installs the package with its pinned dependencies (constraints.txt pins torch to the CPU build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-baseline bench-prune-structured bench-sparsity bench-prune-layers bench-quantize bench-quantize-int8 bench-quantize-lowbit \
	bench-pipelines bench-distill bench-distill-scarce bench-lowrank bench-deep-compression \
	bench-deep-compression-80 bench-composition bench-latency-prune bench-search bench-search-ort bench-mixed-precision bench-sam-prune bench-owl bench-awq bench-lm bench-ddp bench-epi-prune bench-distill-recovery bench-distill-minilm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[test]'
	touch $(STAMP)

$(VENV)/.bench: $(STAMP)
	$(PIP) -e '.[test,bench]'
	touch $(VENV)/.bench

demo: $(STAMP)
	$(BIN)/nncompress demo

# the default tier on two worker processes (every test runs torch on one thread): ~2.5 min on 2 cores
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# the slow tier: full example recipes (MiniLM end to end) and the whole composition matrix; CI runs it too
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu"

bench: bench-baseline bench-prune-structured bench-sparsity bench-quantize bench-mixed-precision bench-pipelines \
	bench-composition bench-latency-prune bench-search bench-search-ort bench-sam-prune bench-owl bench-awq bench-lm bench-ddp \
	bench-epi-prune bench-distill-recovery bench-distill-minilm

bench-baseline: $(VENV)/.bench
	$(BIN)/python benchmarks/baseline.py --out BENCHMARKS.md

# issue 12: SAM before pruning vs plain training, 3 seeds
bench-sam-prune: $(VENV)/.bench
	$(BIN)/python benchmarks/sam_prune.py --out BENCHMARKS.md

# issue 14: pruning when the early pruning indicator fires vs after training vs at initialisation, 3 seeds
bench-epi-prune: $(VENV)/.bench
	$(BIN)/python benchmarks/epi_prune.py --out BENCHMARKS.md

# issue 14: stage-wise distillation vs plain KD recovering a pruned CNN, same epochs, 3 seeds
bench-distill-recovery: $(VENV)/.bench
	$(BIN)/python benchmarks/distill_recovery.py --out BENCHMARKS.md

# issue 14: attention-probability KL / hidden-state distillation of a pruned all-MiniLM-L6-v2
bench-distill-minilm: $(VENV)/.bench
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/distill_minilm.py --out BENCHMARKS.md

bench-owl: $(VENV)/.bench
	$(BIN)/python benchmarks/owl.py --out BENCHMARKS.md

bench-awq: $(VENV)/.bench
	$(BIN)/python benchmarks/awq.py --out BENCHMARKS.md

# llm-compressor pins transformers <= 5.17 (the project runs a newer one): it gets its own environment
PEERS := .venv-peers
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q -c constraints.txt torch llmcompressor==0.14.0.1
	touch $(PEERS)/.installed

# issue 13: every training stage in one process and under torchrun --nproc_per_node 2
bench-ddp: $(VENV)/.bench
	$(BIN)/python benchmarks/ddp.py --out BENCHMARKS.md

bench-lm: $(VENV)/.bench $(PEERS)/.installed
	$(BIN)/python benchmarks/lm.py --out BENCHMARKS.md

bench-prune-structured: $(VENV)/.bench
	$(BIN)/python benchmarks/prune_structured.py --out BENCHMARKS.md

# the layer / grouped-conv rows alone (bench-prune-structured writes them too)
bench-prune-layers: $(VENV)/.bench
	$(BIN)/python benchmarks/prune_structured.py --only layers --out BENCHMARKS.md

bench-sparsity: $(VENV)/.bench
	$(BIN)/python benchmarks/sparsity.py --out BENCHMARKS.md

# issue 5: MiniLM INT8 vs ONNX Runtime / torch.ao, then low-bit formats, GPTQ and QAT on the CNN
bench-quantize: bench-quantize-int8 bench-quantize-lowbit

bench-quantize-int8: $(VENV)/.bench
	$(BIN)/python benchmarks/quantize_int8.py --out BENCHMARKS.md

bench-quantize-lowbit: $(VENV)/.bench
	$(BIN)/python benchmarks/quantize_lowbit.py --out BENCHMARKS.md

# issue 11 part 3: MiniLM mixed precision under a file budget vs uniform W4 / W8, and ONNX Runtime INT8
# with the most sensitive layers kept float vs ORT's quantize_static / quantize_dynamic and NNCF
bench-mixed-precision: $(VENV)/.bench
	$(BIN)/python benchmarks/mixed_precision.py --out BENCHMARKS.md

# issue 6: distillation, low-rank factorization and Deep Compression, one after the other
bench-pipelines: bench-distill bench-distill-scarce bench-lowrank bench-deep-compression bench-deep-compression-80

bench-distill: $(VENV)/.bench
	$(BIN)/python benchmarks/distill.py --out BENCHMARKS.md

bench-distill-scarce: $(VENV)/.bench
	$(BIN)/python benchmarks/distill.py --variant scarce --out BENCHMARKS.md

bench-lowrank: $(VENV)/.bench
	$(BIN)/python benchmarks/lowrank.py --out BENCHMARKS.md

bench-deep-compression: $(VENV)/.bench
	$(BIN)/python benchmarks/deep_compression.py --out BENCHMARKS.md

bench-deep-compression-80: $(VENV)/.bench
	$(BIN)/python benchmarks/deep_compression.py --variant 80 --out BENCHMARKS.md

# issue 10: every ordered pair of transforms on a tiny MLP, CNN and BERT (compose or typed refusal)
bench-composition: $(VENV)/.bench
	$(BIN)/python benchmarks/composition.py --out BENCHMARKS.md

# issue 11: latency-aware pruning (HALP) vs MAC-driven, and latency-table accuracy
bench-latency-prune: $(VENV)/.bench
	$(BIN)/python benchmarks/latency_prune.py --out BENCHMARKS.md

# issue 11: multi-objective search (per-group prune ratios x fine-tune x weight bits) vs uniform baselines
bench-search: $(VENV)/.bench
	$(BIN)/python benchmarks/search.py --out BENCHMARKS.md

bench-search-ort: $(VENV)/.bench
	$(BIN)/python benchmarks/search.py --variant ort --out BENCHMARKS.md

clean:
	rm -rf $(VENV) runs .pytest_cache
