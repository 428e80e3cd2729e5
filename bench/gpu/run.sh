# Device call 2: the text weights arrive (fp16 on the wire, fp32 on disk as in the package), then
# the benchmark on data/ (text, image; audio left out), the larger MovieLens workload, and the
# CUDA/CPU agreement check.
source bench/gpu/prelude.sh
rm -rf /tmp/d1 && cp -r data /tmp/d1 && $PY - <<'P' || exit 22
import csv
rows = list(csv.DictReader(open('/tmp/d1/items.csv', newline='', encoding='utf-8')))
keep = [k for k in rows[0] if k != 'audio']
with open('/tmp/d1/items.csv', 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=keep, extrasaction='ignore'); w.writeheader(); w.writerows(rows)
P
for r in 1 2; do
  echo "== data/ sample (no audio), run $r"
  $PY bench/gpu/bare.py bench/embed.py --data /tmp/d1 --out "$OUT/embed_sample_$r.json" || exit 24
done
echo "== MovieLens x6 texts + 2,400 posters, decode_workers 2 (default)"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --out "$OUT/embed_big.json" || exit 25
echo "== the same, decode_workers 8"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --set embed.decode_workers=8 --out "$OUT/embed_big_w8.json" || exit 26
echo "== CUDA bf16 against CPU fp32"
$PY bench/gpu/bare.py bench/gpu/agree.py /tmp/ml || exit 27
echo run-ok
