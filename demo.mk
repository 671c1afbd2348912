# The demo chain behind `make all`. Every step is a file target, so a second `make all` only prints
# the report, and an interrupted step resumes (caches and training runs pick up where they stopped).
# Each step is a plain sad-pipe command with a config from $(CONFIGS)/.

# DEMO and the configs' paths agree (runs/demo); the knobs below let tests run the same chain in miniature.
DEMO := runs/demo
CONFIGS ?= configs/demo
CORPUS_MB ?= 8
VOCAB ?= 8192
SMALL_METHODS ?= ce full subset hybrid curriculum
MEDIUM_METHODS ?= ce subset hybrid
SEEDS ?= 3
STUDENT_RUNS := $(foreach m,$(SMALL_METHODS),$(DEMO)/students/small/$(m)/result.json) \
                $(foreach m,$(MEDIUM_METHODS),$(DEMO)/students/medium/$(m)/result.json)

all: $(DEMO)/report.md
	@echo
	@echo "==> $(DEMO)/report.md (plots in $(DEMO)/plots/)"
	@sed -n '/^## Students/,$$p' $(DEMO)/report.md

demo: all

$(DEMO)/corpus/corpus.jsonl: | $(STAMP)
	$(SAD) demo corpus $(DEMO)/corpus --max-mb $(CORPUS_MB)

$(DEMO)/tokenizer/tokenizer.json: $(DEMO)/corpus/corpus.jsonl
	$(SAD) demo tokenizer $< $(DEMO)/tokenizer --vocab-size $(VOCAB)

$(DEMO)/tokens/manifest.json: $(DEMO)/tokenizer/tokenizer.json $(CONFIGS)/tokens.json
	$(SAD) cache-teacher --config $(CONFIGS)/tokens.json

$(DEMO)/teacher/result.json: $(DEMO)/tokens/manifest.json $(CONFIGS)/teacher.json
	$(SAD) train-student --config $(CONFIGS)/teacher.json

$(DEMO)/cache/manifest.json: $(DEMO)/teacher/result.json $(CONFIGS)/cache.json
	$(SAD) cache-teacher --config $(CONFIGS)/cache.json

$(DEMO)/students/%/result.json: $(DEMO)/cache/manifest.json
	$(SAD) train-student --config $(CONFIGS)/student-$(word 1,$(subst /, ,$*)).json \
		--config $(CONFIGS)/methods/$(word 2,$(subst /, ,$*)).json --output $(DEMO)/students/$*

$(DEMO)/report.md: $(STUDENT_RUNS)
	$(SAD) demo report $(DEMO) > /dev/null

# The method comparison over seeds (small student): paired differences with their spread and worst seed.
#   make compare                              the demo's own (flat) teacher, 200 steps, SEEDS seeds
#   make compare TEACHER=sharp STEPS=1000     a sharp teacher (top-256 >= 0.9 of its mass, like real LLMs),
#                                             built once per machine (sad-pipe demo sharp-teacher), and its cache
# Results: $(DEMO)/compare/<teacher>-<steps>/compare.md
TEACHER ?= flat
STEPS ?= 200
COMPARE_METHODS ?= ce full subset tail sampled hybrid
ifeq ($(TEACHER),sharp)
COMPARE_CACHE := $(DEMO)-sharp/cache
COMPARE_TEACHER := $(DEMO)-sharp/teacher
else
COMPARE_CACHE := $(DEMO)/cache
COMPARE_TEACHER := $(DEMO)/teacher/final
endif
COMPARE_DIR := $(DEMO)/compare/$(TEACHER)-$(STEPS)

$(DEMO)-sharp/teacher/config.json: | $(STAMP)
	$(SAD) demo sharp-teacher $(DEMO)-sharp/teacher

# The demo's cache settings, the sharp teacher's held-out documents (it never trained on them).
$(DEMO)-sharp/cache/manifest.json: $(DEMO)-sharp/teacher/config.json $(CONFIGS)/cache.json
	$(SAD) cache-teacher --config $(CONFIGS)/cache.json --set teacher.model=$(DEMO)-sharp/teacher \
		--set data.path=$(DEMO)-sharp/teacher/held-out.jsonl --set data.max_documents=null --set cache.path=$(DEMO)-sharp/cache

compare: $(COMPARE_CACHE)/manifest.json
	@for s in $$(seq 0 $$(($(SEEDS) - 1))); do for m in $(COMPARE_METHODS); do \
		d=$(COMPARE_DIR)/seed-$$s/$$m; test -f $$d/result.json && continue; \
		$(SAD) train-student --config $(CONFIGS)/student-small.json --config $(CONFIGS)/methods/$$m.json \
			--set cache.path=$(COMPARE_CACHE) --set teacher.model=$(COMPARE_TEACHER) --set train.max_steps=$(STEPS) \
			--set train.seed=$$s --set train.eval_steps=0 --set train.save_steps=0 --output $$d || exit 1; \
	done; done
	$(SAD) demo compare $(COMPARE_DIR)

# Hidden states a real cache can afford (README "Hidden states"): the curriculum student (feature + relation
# phases after 30%) trained from caches of the demo teacher that differ only in how they store hidden states,
# each saving paired with full bf16 states over seeds.
#   make compare-hidden                       bf16 vs HIDDEN_MODES, STEPS steps, SEEDS seeds
# Results: $(DEMO)/compare-hidden/<steps>/compare.md
HIDDEN_MODES ?= rank32-int8 rank64-int8 bf16-every4
HIDDEN_bf16 :=
HIDDEN_int8 := --set cache.hidden_dtype=int8
HIDDEN_rank32-int8 := --set cache.hidden_rank=32 --set cache.hidden_dtype=int8
HIDDEN_rank64-int8 := --set cache.hidden_rank=64 --set cache.hidden_dtype=int8
HIDDEN_rank32-bf16 := --set cache.hidden_rank=32
HIDDEN_bf16-every4 := --set cache.hidden_positions=every:4
HIDDEN_DIR := $(DEMO)/compare-hidden/$(STEPS)

$(DEMO)/hidden-caches/%/manifest.json: $(DEMO)/teacher/result.json $(CONFIGS)/cache.json
	$(SAD) cache-teacher --config $(CONFIGS)/cache.json --set cache.path=$(DEMO)/hidden-caches/$* $(HIDDEN_$*)

compare-hidden: $(foreach m,bf16 $(HIDDEN_MODES),$(DEMO)/hidden-caches/$(m)/manifest.json)
	@for s in $$(seq 0 $$(($(SEEDS) - 1))); do for m in bf16 $(HIDDEN_MODES); do \
		d=$(HIDDEN_DIR)/seed-$$s/$$m; test -f $$d/result.json && continue; \
		$(SAD) train-student --config $(CONFIGS)/student-small.json --config $(CONFIGS)/methods/curriculum.json \
			--set cache.path=$(DEMO)/hidden-caches/$$m --set train.max_steps=$(STEPS) --set train.seed=$$s \
			--set train.eval_steps=0 --set train.save_steps=0 --output $$d || exit 1; \
	done; done
	$(SAD) demo compare $(HIDDEN_DIR) --baseline bf16 --within 0.5

clean-demo:
	rm -rf $(DEMO)
