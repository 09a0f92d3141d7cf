# Two entry points for a fresh machine: `make demo` (install + main job) and `make test` (install + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= outputs/demo

.PHONY: install browser demo test lint bench bench-scale gpu-check clean

# torch 2.13.0 first: its CPU build is on this machine's index, and with it in place pip pulls no CUDA wheels.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian's Chromium, only for the browser test of the demo (Playwright drives it; it never downloads a browser).
# System-wide and large (~480 MB with its libraries): `make test` installs it with apt (as root), `make demo` does
# not; `make test BROWSER=0` never installs it and the browser test is skipped with its reason.
BROWSER ?= 1
browser:
ifeq ($(BROWSER),0)
	@echo "note: BROWSER=0: chromium is not installed; the browser test will be skipped"
else
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "note: chromium could not be installed; the browser test will be skipped"
endif

install: $(STAMP)

demo: install
	$(BIN)/diffroute generate --model emoji --plan emoji:fastest --plan fora-3 --steps 20 --out $(OUT)

test: install browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DIFFROUTE_BROWSER=$(BROWSER) $(BIN)/python -m pytest -q --durations=25

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/diffroute bench overhead --model tiny-pixart

# The README's "at the scale users run" figures on this CPU (~16 min on 2 cores), written to docs/bench/.
bench-scale: install
	mkdir -p docs/bench
	$(BIN)/diffroute bench scale --json > docs/bench/scale-cpu.json.tmp && mv docs/bench/scale-cpu.json.tmp docs/bench/scale-cpu.json
	$(BIN)/python -m diffroute.cli.bench_scale docs/bench/scale-cpu.json > docs/bench/scale-cpu.md
	$(BIN)/diffroute bench reuse --json > docs/bench/reuse-cpu.json.tmp && mv docs/bench/reuse-cpu.json.tmp docs/bench/reuse-cpu.json

# On a machine with a CUDA GPU (see docs/gpus.md): the CUDA tests and `bench scale` on CUDA, results in gpu-results/.
gpu-check:
	bash .ci/gpu-check

clean:
	rm -rf $(VENV) outputs .pytest_cache

# ---- Rebuilding the embedded emoji model and the figures the README shows (long; see README for times) ----
# The shipped schedules (installed by `make search`) and every plan and peer setting the README table compares.
SHIPPED ?= emoji:gentle,emoji:fast,emoji:faster,emoji:fastest,emoji:turbo,$(BLOCKS),$(HYBRID),$(FITTED)
# the whole-block front, as searched and with runs of whole blocks reused as one residual (+spans)
BLOCKS ?= emoji:blocks-gentle,emoji:blocks-fast,emoji:blocks-brisk,emoji:blocks-swift,emoji:blocks-faster,emoji:blocks-fastest,emoji:blocks-gentle+spans,emoji:blocks-fast+spans,emoji:blocks-brisk+spans,emoji:blocks-swift+spans,emoji:blocks-faster+spans,emoji:blocks-fastest+spans
# the threshold searches' shipped members: checked per prompt (only the gentle end was checked) and per batch
# (checked from 0.70 to 0.99 of full's predicted time); cheaper members are static, shipped as emoji:blocks-*
HYBRID ?= emoji:hybrid-gentle,emoji:hybrid-gentle+spans,emoji:hybrid-batch-mild,emoji:hybrid-batch-gentle,emoji:hybrid-batch-fast,emoji:hybrid-batch-fast+spans
# Learning-to-Cache routers shipped as emoji:NAME, one per compute penalty (NAME=LAMBDA).
L2C_SHIP ?= l2c-lam3e-4=3e-4 l2c=1e-3 l2c-lam3e-3=3e-3
L2C_FLAGS ?= --model emoji --dtype bfloat16 --n 64 --iters 400 --batch 1 --lr 0.1
ROUTERS ?= emoji:l2c-lam3e-4,emoji:l2c,emoji:l2c-lam3e-3
# Every peer setting the comparisons run: diffusers' caches and cache-dit's DBCache, each at its three settings.
PEERS ?= diffusers:fbc-0.1,diffusers:fbc-0.2,diffusers:fbc-0.3,diffusers:pab-2,diffusers:pab-3,diffusers:pab-4,diffusers:faster-2,diffusers:faster-3,diffusers:faster-4,diffusers:taylorseer-2,diffusers:taylorseer-3,diffusers:taylorseer-4,diffusers:mag-0.06,diffusers:mag-0.12,diffusers:mag-0.24,cachedit:dbcache-F1B0-0.1,cachedit:dbcache-F1B0-0.2,cachedit:dbcache-F1B0-0.3,cachedit:dbcache-taylor-F1B0-0.1
COMPARE_PLANS ?= full,fora-2,fora-3,fora-4,fora-3-w2,taylor-3,taylor-3-w2,fbcache-0.1,dbcache-F1B1-0.1,fbcache-0.1-prompt,fbcache-0.2-prompt,fbcache-0.3-prompt,fbcache-0.1-batch,fbcache-0.2-batch,fbcache-0.3-batch,teacache-0.3,$(SHIPPED),$(FITSEARCHED),$(FITWHOLE),$(ROUTERS),$(PEERS)

.PHONY: data train quality calibrate l2c elastic moe adapt streams search search-blocks search-fitted search-fitted-whole fit fit-spans fit-blocks search-hybrid search-hybrid-batch compare compare-fit compare-fit-bf16 compare-fit-bf16-malloc compare-peers-bf16 compare-fp32 demo-grid artifacts experts gates-image gates-image-fast gates-blocks

data: install
	$(BIN)/python -m diffroute.data.emoji

# Phase 1 (5.5k steps, fp32) then phase 2 (3.5k steps, bf16 autocast, warm restart); resumable; exports into the package.
train: install
	$(BIN)/python -m diffroute.zoo.train_emoji --out runs/emoji --transformer-steps 5500 --finetune-steps 3500

quality: install
	$(BIN)/python -m diffroute.zoo.evaluate_emoji --out docs

calibrate: install
	$(BIN)/diffroute calibrate --model emoji --out diffroute/zoo/weights/emoji/teacache.json
	$(BIN)/diffroute calibrate --model emoji --method magcache --out diffroute/zoo/weights/emoji/magcache.json

# L2C routers train from scratch on the shipped model (their run folders resume an interrupted training).
l2c: install
	for spec in $(L2C_SHIP); do name=$${spec%%=*}; lam=$${spec#*=}; rm -rf runs/l2c/$$name; \
		$(BIN)/diffroute train l2c $(L2C_FLAGS) --lam $$lam --out runs/l2c/$$name --ship $$name --replace || exit 1; done

# The Elastic-DiT-style router, trained with its backbone (a fine-tuned model variant): installs the zoo model
# emoji-elastic with its router emoji-elastic:elastic, then measures them side by side and draws the per-sample
# compute histogram (docs/elastic).
ELASTIC_FLAGS ?= --model emoji --bf16 --n 64 --iters 1200 --batch 1 --finetune --backbone-lr 1e-4
elastic: install
	rm -rf runs/elastic/emoji docs/elastic
	$(BIN)/diffroute train elastic $(ELASTIC_FLAGS) --out runs/elastic/emoji --ship elastic --replace
	$(BIN)/diffroute eval compare --model emoji-elastic --dtype bfloat16 --prompts heldout --n 356 --batch 32 \
		--repeats 5 --plans full,emoji-elastic:elastic --out docs/elastic/compare
	$(BIN)/diffroute eval histogram --model emoji-elastic --dtype bfloat16 --plan emoji-elastic:elastic --n 356 \
		--out docs/elastic

# The expert-choice MoE experiment (issues 11, 26): five fine-tunes of the shipped model on the same batches and seeds
# (MoE at k = 2 of 6 routed experts = 50% of the FFN's FLOPs, the dense and magnitude-pruned baselines, the
# clean-heavy and noise-heavy capacity schedules at the same mean k), 2,000 steps each with snapshots every 500; the
# models at 500, 1,000 and 2,000 steps are scored on the 356 held-out captions (the FD curve; add 001500 to
# MOE_SNAPSHOTS for one more point, ~5 min per run); installs the clean-heavy run (the best MoE when
# this was measured) as the zoo model emoji-moe; the table, curve, load plot and FFN benchmarks (emoji size and
# PixArt-XL width) go to docs/moe.
# Resumable: a rerun continues the runs where they stopped (delete runs/moe to start over).
MOE_FLAGS ?= --model emoji --iters 2000 --snapshots 4
MOE_RUNS ?= static2 dense pruned clean13 noise13
MOE_SNAPSHOTS ?= 000500 001000
EVAL_MOE = --dtype bfloat16 --prompts heldout --n 356 --batch 32 --repeats 1 --plans full
moe: install
	$(BIN)/diffroute train moe $(MOE_FLAGS) --variant moe --capacity static:2 --out runs/moe/static2
	$(BIN)/diffroute train moe $(MOE_FLAGS) --variant dense --out runs/moe/dense
	$(BIN)/diffroute train moe $(MOE_FLAGS) --variant moe --capacity clean:1-3 --out runs/moe/clean13 \
		--ship emoji-moe --replace
	$(BIN)/diffroute train moe $(MOE_FLAGS) --variant pruned --out runs/moe/pruned
	$(BIN)/diffroute train moe $(MOE_FLAGS) --variant moe --capacity noise:1-3 --out runs/moe/noise13
	for r in $(MOE_RUNS); do test -f runs/moe/$$r/compare/results.json || $(BIN)/diffroute eval compare \
		--model runs/moe/$$r/model $(EVAL_MOE) --out runs/moe/$$r/compare || exit 1; \
		for k in $(MOE_SNAPSHOTS); do test -f runs/moe/$$r/compare-$$k/results.json || $(BIN)/diffroute eval \
		compare --model runs/moe/$$r/snapshots/step-$$k $(EVAL_MOE) --out runs/moe/$$r/compare-$$k || exit 1; \
		done; done
	rm -rf docs/moe
	$(BIN)/diffroute eval moe $(addprefix runs/moe/,$(MOE_RUNS)) --base docs/compare/results.json --out docs/moe
	for r in $(MOE_RUNS); do mkdir -p docs/moe/runs/$$r && cp runs/moe/$$r/summary.json runs/moe/$$r/settings.json \
		docs/moe/runs/$$r/ && for c in runs/moe/$$r/compare runs/moe/$$r/compare-*; do \
		cp $$c/results.json docs/moe/runs/$$r/$$(basename $$c).json || exit 1; done; done
	for d in bfloat16 float32; do $(BIN)/diffroute bench moe --model emoji --dtype $$d --batch 32 --repeats 40 \
		>> docs/moe/bench.md || exit 1; done
	for d in bfloat16 float32; do $(BIN)/diffroute bench moe --family pixart-alpha-xl --dtype $$d --batch 2 \
		--tokens 4096 --ks 1,2,3 --repeats 8 >> docs/moe/bench.md || exit 1; done

# The adaptation experiment (issue 14): FeRA (3 experts of rank 4) as in the paper (alpha 1, no balancing) and matched
# (alpha 3: at equal routing weights exactly one LoRA of rank 12; balance 0.01 against router collapse) against peft
# LoRA of rank 4 (same rank per expert) and rank 12 (same parameters) on the Symbola glyphs, same steps, seeds and
# batches (and the matched FeRA without its consistency loss, an ablation); scored against the 105 held-out Symbola
# images; table, grid and FeRA's routing weights against t in docs/fera.
ADAPT_FLAGS ?= --model emoji --iters 1000 --lr 5e-4 --ema-decay 0.995 --seed 0
ADAPT_RUNS ?= fera fera-matched fera-matched-nofecl lora4 lora12
adapt: install
	rm -rf runs/fera docs/fera
	$(BIN)/diffroute train fera $(ADAPT_FLAGS) --out runs/fera/fera
	$(BIN)/diffroute train fera $(ADAPT_FLAGS) --alpha 3 --balance 0.01 --out runs/fera/fera-matched
	$(BIN)/diffroute train fera $(ADAPT_FLAGS) --alpha 3 --balance 0.01 --fecl 0 --out runs/fera/fera-matched-nofecl
	$(BIN)/diffroute train lora $(ADAPT_FLAGS) --rank 4 --out runs/fera/lora4
	$(BIN)/diffroute train lora $(ADAPT_FLAGS) --rank 12 --out runs/fera/lora12
	for r in $(ADAPT_RUNS); do $(BIN)/diffroute eval compare --model runs/fera/$$r/model --dtype bfloat16 \
		--prompts heldout --n 105 --batch 35 --repeats 1 --plans full --out runs/fera/$$r/compare || exit 1; done
	$(BIN)/diffroute eval adapt $(addprefix runs/fera/,$(ADAPT_RUNS)) --out docs/fera

# The residual-stream experiment (issue 14): the DAR retrofit against a plain fine-tune of the shipped model (equal
# steps); DAR, DTR and the plain baseline from scratch, two seeds each, scored at half and all of their steps
# (snapshots); table with the issue's targets, FD curves and DAR's weights against t in docs/streams; the blocks DAR
# weights least (and, as the equal-compute control, most) reused every other step, measured in docs/streams/schedules.
RETRO_FLAGS ?= --model emoji --iters 600 --lr 1e-4 --ema-decay 0.995 --seed 0
SCRATCH_FLAGS ?= --model emoji --init scratch --iters 2000 --batch-size 32 --lr 5e-4 --ema-decay 0.99 --snapshots 4
SCRATCH_RUNS ?= plain-s0 dar-s0 dtr-s0 plain-s1 dar-s1 dtr-s1
EVAL_HELD ?= --dtype bfloat16 --prompts heldout --n 356 --batch 32
EVAL_FULL ?= $(EVAL_HELD) --repeats 1 --plans full
streams: install
	rm -rf runs/streams docs/streams
	$(BIN)/diffroute train dar $(RETRO_FLAGS) --out runs/streams/dar-retrofit
	$(BIN)/diffroute train plain $(RETRO_FLAGS) --out runs/streams/plain-ft
	for r in dar-retrofit plain-ft; do \
		$(BIN)/diffroute eval compare --model runs/streams/$$r/model $(EVAL_FULL) --out runs/streams/$$r/compare \
		|| exit 1; done
	for s in 0 1; do \
		$(BIN)/diffroute train plain $(SCRATCH_FLAGS) --seed $$s --out runs/streams/plain-s$$s && \
		$(BIN)/diffroute train dar $(SCRATCH_FLAGS) --mode scratch --seed $$s --out runs/streams/dar-s$$s && \
		$(BIN)/diffroute train dtr $(SCRATCH_FLAGS) --seed $$s --out runs/streams/dtr-s$$s || exit 1; done
	for r in $(SCRATCH_RUNS); do for k in 001000 002000; do $(BIN)/diffroute eval compare \
		--model runs/streams/$$r/snapshots/step-$$k $(EVAL_FULL) --out runs/streams/$$r/compare-$$k || exit 1; \
		done; done
	$(BIN)/diffroute eval streams runs/streams/dar-retrofit runs/streams/plain-ft \
		$(addprefix runs/streams/,$(SCRATCH_RUNS)) --dar runs/streams/dar-retrofit --skip-schedules 2 --out docs/streams
	$(BIN)/diffroute eval compare --model runs/streams/dar-retrofit/model $(EVAL_HELD) --repeats 3 \
		--plans full,docs/streams/dar-lowest-2.json,docs/streams/dar-highest-2.json --out docs/streams/schedules

# The search restarts from scratch (its archive belongs to the model it ran on) and installs the shipped schedules.
# bf16 (this CPU runs it ~4x faster than fp32; quality is measured against bf16 `full`), 64 calibration captions,
# population 48, stopped on a hypervolume plateau or after 42 minutes of search.
SEARCH_FLAGS ?= --dtype bfloat16 --steps 20 --n 64 --pop 48 --generations 40 --patience 4 --quality psnr_mean \
	--cost latency_model --budget-minutes 42
SHIP ?= gentle=0.9,fast=0.7,faster=0.5,fastest=0.4,turbo=0.3
# The whole-block search (issue 25): the same settings with whole-block genes, seeded with the front shipped above
# (so it runs after `search`), 30 minutes.
BLOCKS_SEARCH_FLAGS ?= --dtype bfloat16 --steps 20 --n 64 --pop 48 --generations 40 --patience 4 --quality psnr_mean \
	--cost latency_model --budget-minutes 30 --whole-blocks
BLOCKS_SHIP ?= blocks-gentle=0.9,blocks-fast=0.7,blocks-brisk=0.62,blocks-swift=0.57,blocks-faster=0.5,blocks-fastest=0.4
# The fitted search (issue 25): the whole-block search, each candidate scored as it is once its reuses are fitted
# (--fitted 16: the closed-form fit on 16 more training captions; no forecast genes), 35 minutes; its members ship
# as base schedules whose fitted versions `make fit` installs (emoji:fitsearch-NAME-fit).
FITSEARCH_FLAGS ?= $(BLOCKS_SEARCH_FLAGS) --budget-minutes 35 --fitted 16
FITSEARCH_SHIP ?= fitsearch-brisk=0.612,fitsearch-swift=0.559,fitsearch-faster=0.5
# The fitted search priced as what it ships (issue 25): every block whose components all reuse is reused whole (no
# gene; `--whole-blocks always`) and the latency table prices fitted stand-ins, 35 minutes. Its members near 0.51
# and 0.55 of full's predicted time were the fitted search's `faster` and `swift` (shipped as their -blockfit
# versions); the one new member shipped is `faster`, a base schedule (block reuse marked) whose fitted version
# `make fit` installs (emoji:fitwhole-faster-fit).
FITWHOLE_FLAGS ?= $(FITSEARCH_FLAGS) --whole-blocks always
FITWHOLE_SHIP ?= fitwhole-faster=0.49
# The threshold search (issue 25, item 3): whole-block genes and a first-block check threshold per step, so that the
# shipped plans decide per image; seeded with FBCache's own decisions and the fronts shipped above, 30 minutes.
HYBRID_SEARCH_FLAGS ?= $(BLOCKS_SEARCH_FLAGS) --thresholds
HYBRID_SHIP ?= hybrid-gentle=0.9
# the same search with checks that decide for the whole batch (as diffusers' FBC; no split batches)
HYBRID_BATCH_SHIP ?= hybrid-batch-mild=0.93,hybrid-batch-gentle=0.83,hybrid-batch-fast=0.75
# Fitted reuse (issue 25): each whole-block schedule's reuses fitted as extrapolations from their last two outputs,
# one calibration call on 64 training captions in fp32 (the model's own dtype), then FIT_REFINE epochs of training
# on the final image (policies/refining.py, ~6 min per plan here), installed as emoji:NAME-fit.
FIT_SHIP ?= blocks-gentle blocks-fast blocks-brisk blocks-swift blocks-faster fitsearch-brisk fitsearch-swift fitsearch-faster \
	fitwhole-faster
FIT_REFINE ?= 6
# the refinement's loss (calibrate --refine-loss): per-image+pooled keeps the largest errors down, which the per-image
# loss alone let grow (FD at blocks-brisk 0.0198 -> 0.0269; docs/plans.md)
FIT_LOSS ?= per-image+pooled
# One fitting loop for `fit`, `fit-spans` and `fit-blocks`: $(call fit_each,NAMES,PLAN SUFFIX,KIND) fits and refines
# emoji:NAME+SUFFIX for each NAME and installs it as emoji:NAME-KIND (log and JSON in runs/fit/NAME-KIND.*).
define fit_each
	mkdir -p runs/fit
	for p in $(1); do \
		$(BIN)/diffroute calibrate --method fit --model emoji --dtype float32 --n 64 --plan emoji:$$p$(2) \
			--refine $(FIT_REFINE) --refine-loss $(FIT_LOSS) --out runs/fit/$$p-$(3).json --ship $$p-$(3) --replace --json > runs/fit/$$p-$(3).log || exit 1; \
	done
endef
fit: install
	$(call fit_each,$(FIT_SHIP),,fit)

# The same with one weight per run of blocks reused whole (PLAN+spans, `Schedule.fit_spans`): each run costs two
# adds however long it is (core/fitted.py), installed as emoji:NAME-spanfit. Not blocks-gentle: it reuses no two
# neighbouring blocks at one step, so its span fit is its -fit (same weights, checked).
FIT_SPANS_SHIP ?= blocks-fast blocks-brisk blocks-swift blocks-faster
fit-spans: install
	$(call fit_each,$(FIT_SPANS_SHIP),+spans,spanfit)

# The fitted search's plan with every block whose components all reuse at a step reused whole (PLAN+blocks): the
# search kept such blocks as three separate fitted reuses, which still run norms and modulation; fitted whole they
# skip them (docs/benchmarks.md "Searched as fitted"), installed as emoji:NAME-blockfit.
FIT_BLOCKS_SHIP ?= fitsearch-faster fitsearch-swift fitsearch-brisk
fit-blocks: install
	$(call fit_each,$(FIT_BLOCKS_SHIP),+blocks,blockfit)

search: install
	rm -rf runs/search/emoji
	$(BIN)/diffroute search --model emoji $(SEARCH_FLAGS) --out runs/search/emoji --ship $(SHIP) --replace
	mkdir -p docs/search && cp runs/search/emoji/front.json runs/search/emoji/front.png docs/search/

search-blocks: install
	rm -rf runs/search/emoji-blocks
	$(BIN)/diffroute search --model emoji $(BLOCKS_SEARCH_FLAGS) --out runs/search/emoji-blocks --ship $(BLOCKS_SHIP) --replace
	mkdir -p docs/search/blocks && cp runs/search/emoji-blocks/front.json runs/search/emoji-blocks/front.png docs/search/blocks/

search-fitted: install
	rm -rf runs/search/emoji-fitted
	$(BIN)/diffroute search --model emoji $(FITSEARCH_FLAGS) --out runs/search/emoji-fitted --ship $(FITSEARCH_SHIP) --replace
	mkdir -p docs/search/fitted && cp runs/search/emoji-fitted/front.json runs/search/emoji-fitted/front.png docs/search/fitted/

search-fitted-whole: install
	rm -rf runs/search/emoji-fitwhole
	$(BIN)/diffroute search --model emoji $(FITWHOLE_FLAGS) --out runs/search/emoji-fitwhole --ship $(FITWHOLE_SHIP) --replace
	mkdir -p docs/search/fitwhole && cp runs/search/emoji-fitwhole/front.json runs/search/emoji-fitwhole/front.png docs/search/fitwhole/

search-hybrid: install
	rm -rf runs/search/emoji-hybrid
	$(BIN)/diffroute search --model emoji $(HYBRID_SEARCH_FLAGS) --out runs/search/emoji-hybrid --ship $(HYBRID_SHIP) --replace
	mkdir -p docs/search/hybrid && cp runs/search/emoji-hybrid/front.json runs/search/emoji-hybrid/front.png docs/search/hybrid/

search-hybrid-batch: install
	rm -rf runs/search/emoji-hybrid-batch
	$(BIN)/diffroute search --model emoji $(HYBRID_SEARCH_FLAGS) --check-per batch --out runs/search/emoji-hybrid-batch --ship $(HYBRID_BATCH_SHIP) --replace
	mkdir -p docs/search/hybrid-batch && cp runs/search/emoji-hybrid-batch/front.json runs/search/emoji-hybrid-batch/front.png docs/search/hybrid-batch/

compare: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	rm -rf docs/compare
	$(BIN)/diffroute eval compare --model emoji --dtype bfloat16 --prompts heldout --n 356 --batch 32 --repeats 5 --plans $(COMPARE_PLANS) --out docs/compare

# Fitted reuse against the plain whole-block schedules and the peers nearest them, in one fp32 run on the 356
# held-out captions (issue 25, docs/benchmarks.md "Fitted reuse"; fp32, the model's own dtype, runs on any CPU;
# compare-fit-bf16 below is the same in bf16). Resumable in runs/compare-fit. Timed with full run beside
# every plan (--pairing neighbours): this VM's speed drifts within a repeat of 18 plans, and a ratio to a full run a
# whole repeat away moved the speed column by up to 30% between two runs of the same images.
FITTED ?= emoji:blocks-gentle-fit,emoji:blocks-fast-fit,emoji:blocks-brisk-fit,emoji:blocks-swift-fit,emoji:blocks-faster-fit
# the fitted search's members (`make search-fitted`), fitted component by component and fitted whole
FITSEARCHED ?= emoji:fitsearch-brisk-fit,emoji:fitsearch-swift-fit,emoji:fitsearch-faster-fit,emoji:fitsearch-brisk-blockfit,emoji:fitsearch-swift-blockfit,emoji:fitsearch-faster-blockfit
# the search priced as it ships (`make search-fitted-whole`), fitted
FITWHOLE ?= emoji:fitwhole-faster-fit
# (the `+spans` and `-spanfit` plans left this set after the run of 2026-12-07 evening: the fits matched or beat
# them at equal FLOPs there, and fewer plans make a shorter repeat; their last figures are in docs/benchmarks.md)
COMPARE_FIT_PLANS ?= full,$(FITTED),$(FITSEARCHED),$(FITWHOLE),emoji:hybrid-batch-mild,diffusers:fbc-0.1,diffusers:fbc-0.2,diffusers:fbc-0.3,cachedit:dbcache-F1B0-0.1,cachedit:dbcache-F1B0-0.2,cachedit:dbcache-F1B0-0.3,cachedit:dbcache-taylor-F1B0-0.1
COMPARE_FIT_DTYPE ?= float32
COMPARE_FIT_OUT ?= compare-fit
compare-fit: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(COMPARE_ENV) $(BIN)/diffroute eval compare --model emoji --dtype $(COMPARE_FIT_DTYPE) --prompts heldout --n 356 --batch 32 --repeats 5 --pairing neighbours --plans $(COMPARE_FIT_PLANS) --out runs/$(COMPARE_FIT_OUT)
	rm -rf docs/$(COMPARE_FIT_OUT) && mkdir -p docs/$(COMPARE_FIT_OUT) && cp runs/$(COMPARE_FIT_OUT)/results.* runs/$(COMPARE_FIT_OUT)/*.png docs/$(COMPARE_FIT_OUT)/

# The same set in bf16 (quality against bf16 `full`), on a CPU with native bf16 (avx512_bf16 or AMX; ~30 min here).
# The fitted weights were fitted and refined in fp32 and are applied as they are.
compare-fit-bf16:
	$(MAKE) compare-fit COMPARE_FIT_DTYPE=bfloat16 COMPARE_FIT_OUT=compare-fit-bf16

# The bf16 set timed with glibc's malloc told to keep freed memory in the process (the usual advice for PyTorch on a
# CPU is jemalloc or tcmalloc, which do the same). By default it hands large freed tensors back to the kernel and
# faults them in again: 0.4-1.0 s of system time per `full` call here, varying from process to process, which moves
# every ratio. Images are the same as compare-fit-bf16's (copy runs/compare-fit-bf16/images there to skip generating).
MALLOC_KEEP ?= MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=536870912
compare-fit-bf16-malloc:
	$(MAKE) compare-fit COMPARE_FIT_DTYPE=bfloat16 COMPARE_FIT_OUT=compare-fit-bf16-malloc COMPARE_ENV="$(MALLOC_KEEP)"

# The same in fp32 (ratios differ a lot between dtypes on a CPU; quality against fp32 `full`): every peer setting
# and the shipped plans that dominated them in bf16 or came nearest (~45 min on 2 cores). Resumable: generated chunks are kept in
# runs/compare-fp32 until the results are written.
COMPARE_FP32_PLANS ?= full,emoji:faster,emoji:blocks-fast+spans,emoji:blocks-brisk+spans,emoji:blocks-swift+spans,emoji:blocks-faster+spans,emoji:hybrid-batch-mild,emoji:hybrid-batch-gentle,emoji:l2c,$(PEERS)
# Every peer setting against the shipped plans that dominated them or came nearest (whole-block, fitted, hybrid), in
# bf16 with full timed beside every plan (--pairing neighbours, 5 repeats): one table for issue 25's "every peer
# setting, bf16" target with the timing that compare-fit uses (docs/benchmarks.md). ~45 min on a 2-core CPU with native
# bf16. Resumable in runs/compare-peers-bf16.
COMPARE_PEERS_PLANS ?= full,emoji:faster,emoji:hybrid-batch-mild,emoji:blocks-fast+spans,emoji:blocks-brisk+spans,emoji:blocks-swift+spans,emoji:blocks-faster+spans,emoji:blocks-fastest+spans,$(FITTED),$(PEERS)
compare-peers-bf16: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/diffroute eval compare --model emoji --dtype bfloat16 --prompts heldout --n 356 --batch 32 --repeats 5 --pairing neighbours --plans $(COMPARE_PEERS_PLANS) --out runs/compare-peers-bf16
	rm -rf docs/compare-peers-bf16 && mkdir -p docs/compare-peers-bf16 && cp runs/compare-peers-bf16/results.* runs/compare-peers-bf16/*.png docs/compare-peers-bf16/

compare-fp32: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/diffroute eval compare --model emoji --dtype float32 --prompts heldout --n 356 --batch 32 --repeats 3 --plans $(COMPARE_FP32_PLANS) --out runs/compare-fp32
	rm -rf docs/compare-fp32 && mkdir -p docs/compare-fp32 && cp runs/compare-fp32/results.* runs/compare-fp32/*.png docs/compare-fp32/

# Per-image gates trained on the final image (issue 25, docs/routers.md "Fourth attempt"): from emoji:l2c, at two
# penalties, plus the biases alone (a learned static plan) as the ablation; fp32 (a bf16 backward through the loop
# is ~20x slower on a CPU without bf16 units); compared with the static plans on 64 held-out captions, paired with
# the plan they start from. ~10 min per training on 2 cores; each resumes from its folder. `gates-image-fast`: the
# same from emoji:fast (ECAD), into runs/gates-fast and docs/gates/fast. The weights' rate ablation (docs/gates/ws):
# make gates-image GATES_NAME=ws GATES_RUNS="rho1e-2:0.1".
GATES_NAME ?= image
GATES_INIT ?= emoji:l2c
GATES_ITERS ?= 150
GATES_LEVEL ?= --cross-attention
GATES_FLAGS ?= --model emoji --dtype float32 --n 64 --prompts-per-batch 4 --iters $(GATES_ITERS) --lr 5e-2 \
	--init $(GATES_INIT) $(GATES_LEVEL) --per-prompt --rollout image
GATES_RUNS ?= rho1e-2:0.02 rho3e-3:0.02 rho1e-2:0
# the static plans each set of gates is compared with (64 held-out captions, fp32)
GATES_STATIC ?= full,emoji:l2c,emoji:fast,emoji:l2c-lam3e-4,emoji:l2c-lam3e-3
gates-image: install
	for r in $(GATES_RUNS); do rho=$${r%%:*}; ws=$${r##*:}; \
		$(BIN)/diffroute train gates $(GATES_FLAGS) --rho $${rho#rho} --weight-lr-scale $$ws \
			--out runs/gates-$(GATES_NAME)/$$rho-ws$$ws --json > /dev/null || exit 1; done
	$(BIN)/diffroute eval compare --model emoji --dtype float32 --prompts heldout --n 64 --batch 32 --repeats 1 \
		--plans $(GATES_STATIC),$$(for r in $(GATES_RUNS); do \
		rho=$${r%%:*}; printf 'runs/gates-$(GATES_NAME)/%s-ws%s/router,' $$rho $${r##*:}; done | sed 's/,$$//') \
		--paired-with $(GATES_INIT) --out runs/gates-$(GATES_NAME)/eval64
	rm -rf docs/gates/$(GATES_NAME) && mkdir -p docs/gates/$(GATES_NAME) && \
		cp runs/gates-$(GATES_NAME)/eval64/results.* runs/gates-$(GATES_NAME)/eval64/speed_quality.png \
		docs/gates/$(GATES_NAME)/
	for r in $(GATES_RUNS); do run=$${r%%:*}-ws$${r##*:}; \
		cp runs/gates-$(GATES_NAME)/$$run/summary.json docs/gates/$(GATES_NAME)/summary-$$run.json; \
		cp runs/gates-$(GATES_NAME)/$$run/log.jsonl docs/gates/$(GATES_NAME)/log-$$run.jsonl; done

gates-image-fast:
	$(MAKE) gates-image GATES_NAME=fast GATES_INIT=emoji:fast GATES_ITERS=200 GATES_RUNS="rho5e-3:0.02 rho1e-2:0.02"

# Block-level gates (issue 25: one gate per step and block; a skipped block reuses its residual, ~2% of a block's
# time): from the whole-block ECAD plan emoji:blocks-fast, at two penalties with the weights' rate of the runs above,
# then the biases alone and a 10x slower rate for the weights; compared with the whole-block and fitted static plans
# (docs/gates/blocks, docs/routers.md "Block-level gates"), with their untrained start (one step at lr 1e-9).
# ~7 min per training on 2 cores. None shipped: every run ends below its start (rerunning a run's training command
# with `--ship NAME --replace` would install it as emoji:NAME).
gates-blocks: install
	$(BIN)/diffroute train gates --model emoji --dtype float32 --n 64 --prompts-per-batch 4 --iters 1 --lr 1e-9 \
		--init emoji:blocks-fast --level block --per-prompt --rollout image --rho 1e-2 --weight-lr-scale 0.02 \
		--out runs/gates-blocks/start --json > /dev/null
	$(MAKE) gates-image GATES_NAME=blocks GATES_INIT=emoji:blocks-fast GATES_LEVEL="--level block" \
		GATES_RUNS="rho3e-2:0.02 rho1e-2:0.02 rho1e-2:0 rho1e-2:0.002" \
		GATES_STATIC=full,emoji:blocks-gentle,emoji:blocks-fast,emoji:blocks-brisk,emoji:blocks-swift,emoji:blocks-gentle-fit,emoji:blocks-fast-fit,emoji:blocks-brisk-fit,emoji:fast,emoji:l2c,runs/gates-blocks/start/router
	cp runs/gates-blocks/start/summary.json docs/gates/blocks/summary-start.json

demo-grid: demo
	cp $(OUT)/grid.png docs/demo_grid.png

# Every shipped artifact and README figure from the model that ships, in dependency order (times: see README).
artifacts: install
	@mkdir -p runs; for t in quality calibrate l2c gates-image gates-image-fast gates-blocks elastic search search-blocks search-fitted search-fitted-whole fit fit-spans fit-blocks search-hybrid search-hybrid-batch compare compare-fit compare-fit-bf16 compare-fit-bf16-malloc compare-peers-bf16 compare-fp32 moe adapt streams experts demo-grid; do \
		start=$$(date +%s); $(MAKE) --no-print-directory $$t || exit 1; \
		echo "artifacts: $$t took $$(( $$(date +%s) - start )) s" | tee -a runs/artifacts-times.txt; \
	done

# Decentralized experts (DDM): a partition per K, K experts trained in isolation (each batch / K, so that together
# they see exactly the dense fine-tune's images), their router, the ensemble; then the FLOP-matched table.
# Every step resumes from its folder; about 45 minutes here.
EXPERT_FLAGS ?= --model emoji --iters 1000 --lr 1e-4 --ema-decay 0.995 --seed 0
EXPERT_KS ?= 4 2
experts: install
	$(BIN)/diffroute train plain $(EXPERT_FLAGS) --batch-size 64 --out runs/experts/dense
	for k in $(EXPERT_KS); do \
		$(BIN)/diffroute train partition --k $$k --out runs/experts/k$$k/partition || exit 1; \
		for i in $$(seq 0 $$((k - 1))); do $(BIN)/diffroute train expert $(EXPERT_FLAGS) --batch-size $$((64 / k)) \
			--partition runs/experts/k$$k/partition --cluster $$i --out runs/experts/k$$k/expert-$$i || exit 1; done; \
		$(BIN)/diffroute train experts-router --model emoji --partition runs/experts/k$$k/partition \
			--experts $$(seq -s, -f "runs/experts/k$$k/expert-%g/model" 0 $$((k - 1))) \
			--out runs/experts/k$$k/ensemble || exit 1; \
	done
	$(BIN)/diffroute eval experts --extra --dense runs/experts/dense/model \
		$(foreach k,$(EXPERT_KS),runs/experts/k$(k)/ensemble) --out docs/experts
