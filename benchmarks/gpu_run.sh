#!/usr/bin/env bash
# One device lease's worth of gpu_bench at 1.5B: the cases in priority order, each invocation bounded by what is left
# of one deadline (BUDGET_S seconds from the start). Results merge into one JSON after every case, so a run cut short
# keeps what it finished.
#
# The GPU machine has torch, transformers, peft and accelerate but no trl or datasets and no network: the wheels travel
# in the git-ignored .whl/ folder (pip download --no-deps ... for Python 3.12, manylinux x86_64; see
# docs/benchmarks.md). Usage there, from the repository root:
#     BUDGET_S=540 RESULTS=$OUT bash benchmarks/gpu_run.sh                 # the whole plan below
#     BUDGET_S=150 RESULTS=$OUT bash benchmarks/gpu_run.sh --cases dpo_lora --variants A,B  # one invocation
set -u
deadline=$((SECONDS + ${BUDGET_S:-540}))
results=${RESULTS:-benchmarks/results}
mkdir -p "$results"
size=${SIZE:-1.5b}
json="$results/gpu_bench_$size.json"
log="$results/gpu_run.log"

source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$log"
python3 -c "import torch, transformers, trl, peft, accelerate, datasets; print(torch.__version__, torch.version.cuda, \
transformers.__version__, trl.__version__, peft.__version__, accelerate.__version__, datasets.__version__)" \
  | tee -a "$log"

bench() {
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 45 ]; then echo "[gpu_run] no time left for: $*" | tee -a "$log"; return; fi
  echo "[gpu_run] $left s left: $*" | tee -a "$log"
  timeout "$left" python3 -m benchmarks.gpu_bench --size "$size" --output "$json" "$@" 2>&1 | tee -a "$log"
}

if [ $# -gt 0 ]; then  # one invocation of the caller's own (e.g. a follow-up of a few variants)
  bench "$@"
  exit 0
fi
# Training cases: warm-up 2, measure 4 optimizer steps (each under a second or two at 1.5B).
bench --cases dpo_lora --variants A,B,B_memory,B_liger,B_precompute --warmup-steps 2 --measure-steps 4
# Online cases: a step is a 512-token rollout (seconds), so warm-up 1, measure 2.
bench --cases ppo_lora,grpo_lora --variants B --warmup-steps 1 --measure-steps 2
bench --cases reward_lora,dpo_full --variants A,B,B_liger,B_precompute --warmup-steps 2 --measure-steps 4
bench --cases generation --variants A,B_static --gen-batch-sizes 64
bench --cases grpo_lora --variants A --warmup-steps 1 --measure-steps 2
echo "[gpu_run] done with $((deadline - SECONDS)) s to spare" | tee -a "$log"
