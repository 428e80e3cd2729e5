"""Device only: the same inputs through the CUDA bf16 path and the CPU fp32 path; cosine per row."""
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding.job import build_encoders
from fusionrec.pipeline.io.tables import resolve_media

src = Path(sys.argv[1])
rows = list(csv.DictReader(open(src / "items.csv", newline="", encoding="utf-8")))
texts = [f"{r['title']}. {r['description']}" for r in rows[:512]]
images = [r["image"] for r in rows if r["image"]][:256]
out = {}
vecs = {}
DEVICES = os.environ.get("AGREE_DEVICES", "cuda,cpu").split(",")  # rehearsal here: "cpu,cpu"
for n, device in enumerate(DEVICES):
    cfg = load_config(None, [f"embed.device={device}"])
    enc = build_encoders(cfg.embed, {"text", "image"})
    t0 = time.perf_counter()
    t = enc["text"].encode(texts)
    i = enc["image"].encode([enc["image"].prepare(resolve_media(src, p)) for p in images])
    vecs[n] = (t, i)
    out[f"{device}_{n}_s"] = round(time.perf_counter() - t0, 2)
for k, name in enumerate(("text", "image")):
    a, b = vecs[0][k], vecs[1][k]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    nn_same = float(np.mean(np.argmax(a @ a.T - 2 * np.eye(len(a)), 1) == np.argmax(b @ b.T - 2 * np.eye(len(b)), 1)))
    out[name] = {"rows": len(a), "cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 6),
                 "max_abs_diff": round(float(np.abs(a - b).max()), 5), "same_nearest_neighbour": round(nn_same, 4)}
print(json.dumps(out, indent=1))
Path(os.environ.get("OUT", "/tmp")).joinpath("agree.json").write_text(json.dumps(out, indent=1) + "\n")
