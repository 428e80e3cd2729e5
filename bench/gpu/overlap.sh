# Device call 2, fourth round: decoding the next shard while the encoder works on this one
# (`embed.read_ahead_shards`, default 1) against decoding and encoding in turn (0), alternated
# twice in one sitting; then 8 decoding threads with read-ahead; and where the time goes
# (forward.py: the text encode loop with one copy back against a copy after each batch).
source bench/gpu/prelude.sh
echo "== where the time goes"
$PY bench/gpu/bare.py bench/gpu/forward.py /tmp/big || exit 24
for r in 1 2; do
  echo "== read_ahead_shards=0 (decode, then encode), round $r"
  $PY bench/gpu/bare.py bench/embed.py --data /tmp/big --set embed.read_ahead_shards=0 --out "$OUT/ra0_r$r.json" || exit 25
  echo "== read_ahead_shards=1 (the default), round $r"
  $PY bench/gpu/bare.py bench/embed.py --data /tmp/big --out "$OUT/ra1_r$r.json" || exit 26
done
echo "== read_ahead_shards=1, decode_workers=8"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --set embed.decode_workers=8 --out "$OUT/ra1_w8.json" || exit 27
echo run4-ok
