# Two commands for a fresh machine:  `make demo` (main job on tinyworld)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: guards-tinyworld demo demo-reference test test-slow tinyworld eval tinyworld-xl eval-xl bundle guarded-bundles bench-sd15 bench-sd15-guards \
        bench-sd15-safepatch bench-sd15-safectrl bench-sd15-stack bench-gpu guards-tinyworld-xl xl-bundles clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel on disk; install first so nothing pulls CUDA builds
	$(PY) -m pip install -q -e '.[cpu,train,dev]'
	$(PY) -m pip install -q --no-deps $(TRITON_TEST)   # Triton tests: no pins (below)
	$(PY) -m pip install -q $(TRITON_CLIENT_DEPS)
	$(PY) -m pip install -q --no-deps --target $(VENV)/triton-stub-site numpy==1.26.4
	touch $(STAMP)

# The Triton tests' server and client, installed without their pins (numpy<2, protobuf<7, ml-dtypes<=0.5.4), which
# would downgrade ours; the wheel's Python stub gets numpy 1.x in a side folder (runtime/serve/server.py).
TRITON_TEST        := nvidia-pytriton==0.7.0 tritonclient==2.73.0
TRITON_CLIENT_DEPS := 'grpcio>=1.81.1' 'geventhttpclient>=2.3.3' 'greenlet<3.4.0' 'python-rapidjson>=0.9.1'

PLAN   := engines/tinyworld.plan
STACK  := engines/tinyworld_stack.plan
comma  := ,
DEMO_PROMPT := a large red circle and a small knife on sand

# the embedded default of `runtime generate` is the four-guard stack; the unguarded image goes beside it
demo: $(STAMP) $(PLAN) $(STACK)  ## generate through the guarded default bundle, next to the unguarded model
	@mkdir -p out
	$(PY) -m runtime generate --prompt "$(DEMO_PROMPT)" --out out/demo.png --report out/demo.json --overwrite
	$(PY) -m runtime compare --prompt "$(DEMO_PROMPT)" --baseline tinyworld --out out/demo_side_by_side.png \
	  --report out/demo_side_by_side.json --overwrite
	@echo "guarded image: $(CURDIR)/out/demo.png (report: out/demo.json); unguarded vs guarded: out/demo_side_by_side.png"

$(PLAN): models/tinyworld/unet/diffusion_pytorch_model.safetensors | $(STAMP)
	$(PY) -m export build --model models/tinyworld --out $(PLAN)

demo-reference: $(STAMP)  ## render a grid of tinyworld prompts with the PyTorch reference (train package)
	@mkdir -p out
	$(PY) -m train tinyworld sample --n 4 --out out/demo-reference.png \
	  --prompt "a large red circle on sand" --prompt "a small blue star and a large yellow heart at night" \
	  --prompt "a large green ring and a large knife on grass" --prompt "a large purple moon at the graveyard"

test: $(STAMP)  ## the default (fast) test suite
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

tinyworld: $(STAMP)  ## retrain tinyworld from scratch (~75 min on 2 cores)
	$(PY) -m train tinyworld fit

eval: $(STAMP)
	$(PY) -m train tinyworld eval --out bench/results/tinyworld_base_eval.json

# tinyworld-xl (issue 18): the same world as a StableDiffusionXLPipeline folder, on tinyworld's VAE and judge.
# Resumable (.cache/tinyworld-xl); on a GPU: `python -m train tinyworld fit --family sdxl --device cuda ...` (README)
tinyworld-xl: $(STAMP)  ## train models/tinyworld-xl on this machine's CPU
	$(PY) -m train tinyworld fit --family sdxl

eval-xl: $(STAMP)  ## tinyworld-xl's unguarded metrics on the test split
	$(PY) -m train tinyworld eval --family sdxl --subset test --out bench/results/tinyworld_xl_eval.json

# The prompt-only recipe on tinyworld (issue 17): prompts + the backbone + the judge -> data -> each guard's weights.
TW_DATA := .cache/data/tinyworld
$(TW_DATA)/data.json: | $(STAMP)
	$(PY) -m train data --model models/tinyworld --prompts train/tinyworld/prompts/unsafe_guard.csv \
	  --rules train/tinyworld/prompts/edit_rules.csv --benign train/tinyworld/prompts/benign_guard.csv \
	  --judge tinyworld --masks train/tinyworld/fewshot --limit 800 --benign-limit 600 --threads 1 --out $(TW_DATA) --resume

guards-tinyworld: $(TW_DATA)/data.json  ## retrain the four guards from prompts only (~75 min on 2 cores)
	$(PY) -m train safeguider --model models/tinyworld --noun-deletions 6 --mine-rounds 2 --mine-judge tinyworld --min-similarity -0.3 --out models/guards/tinyworld/safeguider  # dev: safeguider_dev180/{deletions,min_similarity}
	$(PY) -m train saferedir --model models/tinyworld --data $(TW_DATA) --out models/guards/tinyworld/saferedir --cache .cache/saferedir_data
	$(PY) -m train safepatch --model models/tinyworld --data $(TW_DATA) --out models/guards/tinyworld/safepatch
	# the stack's SafeRedir: its redirect also learns attack-style variants (issue 20)
	$(PY) -m train saferedir --model models/tinyworld --data $(TW_DATA) --adversarial 4 --adversarial-share 0.1 \
	  --out $(STACK_REDIR) --cache .cache/saferedir_adversarial
	$(PY) -m train safectrl --model models/tinyworld --data $(TW_DATA) --out models/guards/tinyworld/safectrl
	# the stack's learned image checker: an image it reads unsafe is sampled again, fully escalated (issue 20)
	$(PY) -m train image-checker --data $(TW_DATA) --threshold $(STACK_CHECKER_THRESHOLD) --threads 2 --out $(dir $(STACK_CHECKER))

bundle: $(STAMP) $(PLAN) $(STACK)  ## the embedded default (the guarded stack) and the unguarded tinyworld bundle
	$(PY) -m runtime info $(STACK)

# Guarded tinyworld bundles: one per guard, and the full stack (weights in models/guards/tinyworld/<guard>/).
GUARDED := safeguider saferedir safepatch safectrl
# a bundle is stale when the guard's weights, its config (run-time settings live there), its module or its export
# code change (export/idle.py: whether the bundle carries denoise_idle)
GUARD_CODE := guards/config.py guards/storage.py export/idle.py
engines/tinyworld_%.plan: models/tinyworld/unet/diffusion_pytorch_model.safetensors models/guards/tinyworld/%/model.safetensors \
                          models/guards/tinyworld/%/config.json guards/%.py export/guards/%.py $(GUARD_CODE) | $(STAMP)
	$(PY) -m export build --model models/tinyworld --guards $* $(GUARD_SETTINGS) --out $@
# fail closed: a prompt whose search finds no qualifying deletion is refused, not generated from the search's best try
# (dev choice: bench/results/safeguider_dev180/deletions/README.md). The search's EOS-cosine floor (-0.3, not the
# paper's 0.1) comes with the weights: their config.json, the floor they were mined with (min_similarity/README.md)
engines/tinyworld_safeguider.plan: GUARD_SETTINGS := --guard-setting safeguider.on_no_qualifier=block

# The stack (issues 17, 20): every guard trained from prompts. SafeGuider gates, the others remove on its flag;
# SafePatch leaves a redirected prompt to SafeRedir, whose redirect also learned attack-style variants, and SafeCtrl
# holds its mask without the floor, as the stack was measured (dev choices: bench/results/stack_prompt_only_dev/README.md).
# A redirected row's negative prompt moves STACK_STEER_WEIGHT of the way to the unsafe kinds' words
# (bench/results/steer_away_dev/README.md), all the way when a later check still reads its latent unsafe, and SafePatch patches it again then; SafeGuider is the
# classifier trained on attack-style edits too (bench/results/escalate_dev/README.md); a learned image checker reads the
# final image and has a request it reads unsafe sampled again with every guard at full strength, refused if still
# unsafe (bench/results/checker_dev/README.md)
STACK_REDIR := models/guards_adversarial/tinyworld/saferedir
STACK_GUIDER := models/guards_adversarial/tinyworld/safeguider
STACK_STEER := knife, blood, skull
STACK_STEER_WEIGHT := 0.4
STACK_ESCALATE := 1.0
STACK_CHECKER := models/checkers/tinyworld/checker.onnx
STACK_CHECKER_THRESHOLD := 0.1
# one composition for both worlds' stacks: SafePatch yields to the redirect, SafeRedir steers and escalates
STACK_SETTINGS := --guard-setting safectrl.latch_floor=0.5 --guard-setting safepatch.yield_to_redirect=true \
  --guard-setting 'saferedir.steer_away=$(STACK_STEER)' --guard-setting saferedir.steer_weight=$(STACK_STEER_WEIGHT) \
  --guard-setting saferedir.steer_escalate=$(STACK_ESCALATE) --guard-setting saferedir.escalate_patch=true
engines/tinyworld_stack.plan: models/tinyworld/unet/diffusion_pytorch_model.safetensors \
                              $(foreach g,$(GUARDED),models/guards/tinyworld/$(g)/model.safetensors \
                              models/guards/tinyworld/$(g)/config.json guards/$(g).py export/guards/$(g).py) \
                              $(foreach w,$(STACK_REDIR) $(STACK_GUIDER),$(w)/model.safetensors $(w)/config.json) \
                              $(STACK_CHECKER) $(STACK_CHECKER:.onnx=.json) $(GUARD_CODE) | $(STAMP)
	$(PY) -m export build --model models/tinyworld --guards $(subst $(eval) ,$(comma),$(GUARDED)) \
	  --guard-weights saferedir=$(STACK_REDIR) \
	  --guard-weights safeguider=$(STACK_GUIDER) $(STACK_SETTINGS) --checker $(STACK_CHECKER) --out $@

engines/tinyworld_text.plan: models/tinyworld/unet/diffusion_pytorch_model.safetensors \
                             $(foreach g,safeguider saferedir,models/guards/tinyworld/$(g)/model.safetensors \
                             models/guards/tinyworld/$(g)/config.json guards/$(g).py export/guards/$(g).py) \
                             $(GUARD_CODE) | $(STAMP)
	$(PY) -m export build --model models/tinyworld --guards safeguider,saferedir --out $@

guarded-bundles: $(foreach g,$(GUARDED),engines/tinyworld_$(g).plan) engines/tinyworld_text.plan engines/tinyworld_stack.plan  ## every guarded bundle

# The same recipe on tinyworld-xl (issue 18), all four guards, then the four-guard SDXL bundle.
TWXL_DATA := .cache/data/tinyworld-xl
XL_GUARDS := models/guards/tinyworld-xl
$(TWXL_DATA)/data.json: | $(STAMP)
	$(PY) -m train data --model models/tinyworld-xl --prompts train/tinyworld/prompts/unsafe_guard.csv \
	  --rules train/tinyworld/prompts/edit_rules.csv --benign train/tinyworld/prompts/benign_guard.csv \
	  --judge tinyworld --masks train/tinyworld/fewshot --limit 800 --benign-limit 600 --threads 1 --out $(TWXL_DATA) --resume

guards-tinyworld-xl: $(TWXL_DATA)/data.json  ## the four guards on tinyworld-xl from prompts only (~95 min on 2 cores)
	$(PY) -m train safeguider --model models/tinyworld-xl --mine-rounds 2 --mine-judge tinyworld --out $(XL_GUARDS)/safeguider  # dev: tinyworld_xl_dev/safeguider
	$(PY) -m train saferedir --model models/tinyworld-xl --data $(TWXL_DATA) --out $(XL_GUARDS)/saferedir --cache .cache/saferedir_data_xl
	$(PY) -m train safepatch --model models/tinyworld-xl --data $(TWXL_DATA) --out $(XL_GUARDS)/safepatch
	$(PY) -m train safectrl --model models/tinyworld-xl --data $(TWXL_DATA) --latch-floor 0.5 --out $(XL_GUARDS)/safectrl  # measured without the floor

XL_UNET := models/tinyworld-xl/unet/diffusion_pytorch_model.safetensors
engines/tinyworld_xl.plan: $(XL_UNET) | $(STAMP)
	$(PY) -m export build --model models/tinyworld-xl --out $@

# one bundle per guard (make picks this over engines/tinyworld_%.plan: the shorter stem wins)
engines/tinyworld_xl_%.plan: $(XL_UNET) $(XL_GUARDS)/%/model.safetensors $(XL_GUARDS)/%/config.json \
                             guards/%.py export/guards/%.py $(GUARD_CODE) | $(STAMP)
	$(PY) -m export build --model models/tinyworld-xl --guards $* --guard-dir models/guards --out $@

# SafePatch leaves a redirected prompt to SafeRedir here (bench/results/stack_yield_dev/README.md); SafeRedir steers
# and escalates as in the SD1 stack (chosen on dev: bench/results/tinyworld_xl_dev/steer_dev/README.md); SD1's learned
# image checker resamples at 0.05 (it read tinyworld-xl's dev winners better than one learned from tinyworld-xl's own
# folder: bench/results/tinyworld_xl_dev/checker_dev/README.md)
XL_CHECKER := $(STACK_CHECKER)
XL_CHECKER_CONFIG := models/checkers/tinyworld/checker_xl.json
engines/tinyworld_xl_safe.plan: $(XL_UNET) $(foreach g,$(GUARDED),$(XL_GUARDS)/$(g)/model.safetensors \
                                $(XL_GUARDS)/$(g)/config.json guards/$(g).py export/guards/$(g).py) \
                                $(XL_CHECKER) $(XL_CHECKER_CONFIG) $(GUARD_CODE) | $(STAMP)
	$(PY) -m export build --model models/tinyworld-xl --guards $(subst $(eval) ,$(comma),$(GUARDED)) \
	  --guard-dir models/guards $(STACK_SETTINGS) --checker $(XL_CHECKER) --checker-config $(XL_CHECKER_CONFIG) --out $@

xl-bundles: engines/tinyworld_xl.plan $(foreach g,$(GUARDED),engines/tinyworld_xl_$(g).plan) engines/tinyworld_xl_safe.plan  ## every tinyworld-xl bundle

# Opt-in: the real SD 1.5 architecture with random weights at 256 px (~4.3 GB model, ~4 GB bundle, ~10 min).
SD15 := .cache/sd15-architecture
$(SD15)/model_index.json: | $(STAMP)
	$(PY) -c "from export.families import make_sd15_architecture; make_sd15_architecture('$(SD15)')"

engines/sd15_random_256.plan: $(SD15)/model_index.json
	$(PY) -m export build --model $(SD15) --height 256 --width 256 --precision fp32 --out $@  # fp32: the CPU path

bench-sd15: engines/sd15_random_256.plan  ## latency on the real SD 1.5 architecture, lean vs PyTorch eager
	$(PY) -m bench latency --engine engines/sd15_random_256.plan --reference $(SD15) --quick --steps 10 \
	  --out bench/results/latency_sd15_random_256_cpu.json

# Opt-in: UNet-guard overhead on the same architecture (issue 6, acceptance 4). Untrained guards at real size,
# published init, decision pinned on / off (train/random_init.py; weights in $(SD15G)/<guard>_<on|off>/), each
# bundle timed against engines/sd15_random_256.plan in one interleaved run. One guard: `make bench-sd15-safectrl`.
SD15G := .cache/sd15-guards
engines/sd15_random_256_safepatch_on.plan engines/sd15_random_256_safepatch_off.plan: export/guards/safepatch.py
engines/sd15_random_256_safectrl_on.plan engines/sd15_random_256_safectrl_off.plan: export/guards/safectrl.py
engines/sd15_random_256_%.plan: $(SD15)/model_index.json train/random_init.py | $(STAMP)
	$(PY) -m train random-init --guard $(word 1,$(subst _, ,$*)) --force $(word 2,$(subst _, ,$*)) --model $(SD15) \
	  --out $(SD15G)/$*/$(notdir $(SD15))/$(word 1,$(subst _, ,$*))
	$(PY) -m export build --model $(SD15) --height 256 --width 256 --precision fp32 \
	  --guards $(word 1,$(subst _, ,$*)) --guard-dir $(SD15G)/$* --out $@

bench-sd15-safepatch bench-sd15-safectrl: bench-sd15-%: engines/sd15_random_256.plan engines/sd15_random_256_%_on.plan engines/sd15_random_256_%_off.plan
	for f in on off; do $(PY) -m bench latency --engine engines/sd15_random_256_$*_$$f.plan \
	  --baseline engines/sd15_random_256.plan --no-reference --quick --steps 10 --prompt-set benign \
	  --out bench/results/latency_sd15_random_256_$*_$$f.json || exit 1; done

bench-sd15-guards: bench-sd15-safepatch bench-sd15-safectrl  ## SafePatch then SafeCtrl, on and off (~1 h on 2 cores)

# Opt-in (issue 18): the four-guard stack at real size, every guard's decision pinned off (a benign prompt: the
# stack's benign overhead) and on (every guard acting), each timed against engines/sd15_random_256.plan in one run.
STACK4 := safeguider,saferedir,safepatch,safectrl
engines/sd15_random_256_stack_%.plan: $(SD15)/model_index.json train/random_init.py $(GUARD_CODE) | $(STAMP)
	for g in $(subst $(comma), ,$(STACK4)); do $(PY) -m train random-init --guard $$g --force $* --model $(SD15) \
	  --out $(SD15G)/stack_$*/$(notdir $(SD15))/$$g || exit 1; done
	$(PY) -m export build --model $(SD15) --height 256 --width 256 --precision fp32 --guards $(STACK4) \
	  --guard-dir $(SD15G)/stack_$* --out $@

bench-sd15-stack: engines/sd15_random_256.plan engines/sd15_random_256_stack_off.plan engines/sd15_random_256_stack_on.plan  ## the four-guard stack at real size, off then on (~40 min on 2 cores)
	for f in off on; do $(PY) -m bench latency --engine engines/sd15_random_256_stack_$$f.plan \
	  --baseline engines/sd15_random_256.plan --no-reference --quick --steps 10 --prompt-set benign \
	  --out bench/results/latency_sd15_random_256_stack_$$f.json || exit 1; done

bench-gpu: $(STAMP)  ## each guard against the plain UNet at real size on a GPU (torch fp16 + CUDA graphs, < 2 min on an H200)
	$(PY) -m bench gpu-overhead --out bench/results/gpu_guard_overhead.json

clean-venv:
	rm -rf $(VENV)
