# Device call 2, second round: text weights, the larger workload, where the time goes, and the
# benchmark with the raw pass warmed up and with larger batches.
source bench/gpu/prelude.sh
echo "== where the time goes"
$PY bench/gpu/bare.py bench/gpu/forward.py /tmp/big || exit 24
echo "== bench, raw pass warmed (defaults)"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --out "$OUT/embed_big_warm.json" || exit 25
echo "== bench, text batch 256, image batch 128, decode_workers 8"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --set embed.text.batch_size=256 --set embed.image.batch_size=128 --set embed.decode_workers=8 --out "$OUT/embed_big_b.json" || exit 26
echo run2-ok
