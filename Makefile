# The two set-up commands the README names: `make demo` (main job) and `make test` (test suite).
# torch is pinned to the local CPU wheel on these machines; the package itself asks for a normal range.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo_output

.PHONY: install demo test

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_PIN)"
	$(PYTHON) -m pip install --quiet -e ".[train,dev]"

demo: install
	efficientvlm demo --output $(DEMO_DIR)

test: install
	$(PYTHON) -m pytest tests

# The split study of issue #10 on top of `make demo`'s output (~60 min on 2 CPU cores):
#   1. an NLVR2 teacher fine-tuned from the demo teacher (2 x 1000 steps: one warm restart of the schedule);
#   2. an NLVR2 student: the demo's distilled student fine-tuned on NLVR2 (task loss, 1500 steps);
#   3. uniform vs manual vs learned splits at total sparsity 0.4 on synthetic retrieval and on synthetic NLVR2.
# Results: $(SPLITS_DIR)/{retrieval,nlvr2}/comparison.{md,json,png}.
SPLITS_DIR ?= splits_output
SEED ?= 0
TRAIN_FLAGS = --image_size 32 --per_device_train_batch_size 32 --lr_scheduler_type cosine --weight_decay 0.01 \
	--save_strategy no --report_to none --disable_tqdm true
NLVR2_FLAGS = --task nlvr2 --learning_rate 5e-4 --warmup_steps 100 --logging_steps 100 --eval_images 400 $(TRAIN_FLAGS)
PRUNE_FLAGS = --target_sparsity 0.4 --max_steps 400 --learning_rate 5e-4 --warmup_steps 40 --reg_learning_rate 0.05 \
	--sparsity_warmup_steps 133 --freeze_masks_step 340 --logging_steps 80 --seed $(SEED) $(TRAIN_FLAGS)

.PHONY: splits
splits: install
	test -d $(DEMO_DIR)/teacher || $(MAKE) demo
	test -f $(SPLITS_DIR)/nlvr2_teacher/config.json || ( \
		efficientvlm teacher --init_from $(DEMO_DIR)/teacher --output_dir $(SPLITS_DIR)/nlvr2_teacher_1000 \
			--max_steps 1000 $(NLVR2_FLAGS) && \
		efficientvlm teacher --init_from $(SPLITS_DIR)/nlvr2_teacher_1000 --output_dir $(SPLITS_DIR)/nlvr2_teacher \
			--max_steps 1000 $(NLVR2_FLAGS) )
	test -f $(SPLITS_DIR)/nlvr2_student/config.json || efficientvlm teacher --init_from $(DEMO_DIR)/student \
		--output_dir $(SPLITS_DIR)/nlvr2_student --max_steps 1500 $(NLVR2_FLAGS)
	efficientvlm compare-splits --task retrieval --student $(DEMO_DIR)/student --teacher $(DEMO_DIR)/teacher \
		--output_dir $(SPLITS_DIR)/retrieval_seed$(SEED) --eval_images 200 --itm_k 8 --lambda_vlp 0.5 $(PRUNE_FLAGS)
	efficientvlm compare-splits --task nlvr2 --student $(SPLITS_DIR)/nlvr2_student \
		--teacher $(SPLITS_DIR)/nlvr2_teacher --output_dir $(SPLITS_DIR)/nlvr2_seed$(SEED) --eval_images 400 \
		--lambda_vlp 0.8 $(PRUNE_FLAGS)
