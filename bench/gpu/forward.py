"""Device only: where the GPU job's time goes. Text: tokenising alone, the forward pass alone on
tokenised batches already on the GPU, and TextEncoder.encode (both), beside the encode loop
before 2026-12-04 (a copy back to the CPU after each batch, which waits for the batch); images:
decoding alone and ImageEncoder.encode on decoded arrays. Every timing after one untimed pass
(kernels chosen)."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fusionrec.pipeline.config import load_config
from fusionrec.pipeline.embedding.job import build_encoders, modality_contents
from fusionrec.pipeline.encoders.base import autocast
from fusionrec.pipeline.io.tables import load_items, resolve_media

data = Path(sys.argv[1])
items = load_items(data)
contents = {m: rows["content"].to_list() for m, rows in modality_contents(items, "item").items() if rows.height}
enc = build_encoders(load_config().embed, set(contents))
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
res = {"text_rows": len(contents["text"]), "image_rows": len(contents["image"])}


def timed(fn):
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


te = enc["text"].encode.__self__
te._load()
texts = contents["text"]
order = np.argsort([-len(t) for t in texts], kind="stable")
def tokenise(bs: int) -> list:
    return [te._tokenizer([texts[i] for i in order[s:s + bs]], padding=True, truncation=True,
                          max_length=te.max_length, return_tensors="pt") for s in range(0, len(texts), bs)]


def forward(batches: list) -> None:
    with torch.inference_mode(), autocast(te.device):
        for b in batches:
            h = te._model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            ((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu()


def encode_copy_each_batch(bs: int) -> None:
    """TextEncoder.encode as it was: tokenise, forward, copy back, batch after batch."""
    with torch.inference_mode():
        for s in range(0, len(texts), bs):
            b = te._tokenizer([texts[i] for i in order[s:s + bs]], padding=True, truncation=True,
                              max_length=te.max_length, return_tensors="pt").to(te.device)
            with autocast(te.device):
                h = te._model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            ((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu().numpy()


for bs in (64, 256):
    te.batch_size = bs
    on_gpu = [b.to(te.device) for b in tokenise(bs)]
    res[f"text_b{bs}"] = {"tokenise_s": round(timed(lambda bs=bs: tokenise(bs)), 3),
                          "forward_s": round(timed(lambda on_gpu=on_gpu: forward(on_gpu)), 3),
                          "encode_copy_each_batch_s": round(timed(lambda bs=bs: encode_copy_each_batch(bs)), 3),
                          "encode_s": round(timed(lambda: te.encode(texts)), 3),
                          "encode_copy_each_batch_again_s": round(timed(lambda bs=bs: encode_copy_each_batch(bs)), 3)}
ie_mod = enc["image"]
ie = next(c.cell_contents for c in ie_mod.encode.__closure__ if hasattr(c.cell_contents, "batch_size"))
paths = contents["image"]
t0 = time.perf_counter()
prepared = [ie_mod.prepare(resolve_media(data, p)) for p in paths]
res["image_decode_serial_s"] = round(time.perf_counter() - t0, 3)
for bs in (32, 128):
    ie.batch_size = bs
    res[f"image_b{bs}_forward_s"] = round(timed(lambda: ie_mod.encode(prepared)), 3)
res["device"] = str(te.device)
print(json.dumps(res, indent=1))
Path(os.environ.get("OUT", "/tmp")).joinpath("forward.json").write_text(json.dumps(res, indent=1) + "\n")
