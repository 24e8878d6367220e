# Sourced by the device scripts (gpu_run.sh, gpu_real_model.sh): installs the wheels carried in .whl/ where TRL is
# missing (the GPU machine has torch, transformers, peft and accelerate, but no trl or datasets, and no network), and
# sets the offline environment. From the repository root: `source benchmarks/gpu_env.sh`.
if [ -d .whl ] && ! python3 -c "import trl" 2>/dev/null; then
  # datasets 5.2 needs pyarrow >= 24; an older pyarrow on the machine gets datasets 4.8 (TRL 1.16 needs >= 4.7).
  arrow_major=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
  wheels=$(ls .whl/*.whl)
  if [ "$arrow_major" -lt 24 ]; then wheels=$(ls .whl/*.whl .whl/alt/*.whl | grep -v 'datasets-5'); fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    || exit 1
fi
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:$PWD; else export PYTHONPATH=$PWD; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
