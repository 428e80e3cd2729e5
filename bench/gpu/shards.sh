# Device call 2, third round: the job on the larger workload with shards of 256 rows (the old
# default) and with 4096 (the default now gives texts 4096 on a GPU, media 256), side by side.
source bench/gpu/prelude.sh
echo "== shard_size=256 (the old default)"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --set embed.shard_size=256 --out "$OUT/embed_shard256.json" || exit 25
echo "== shard_size=4096"
$PY bench/gpu/bare.py bench/embed.py --data /tmp/big --set embed.shard_size=4096 --out "$OUT/embed_shard4096.json" || exit 26
echo run3-ok
