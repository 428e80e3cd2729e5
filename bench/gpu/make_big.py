"""Device only: a larger embedding workload from MovieLens-100K's texts and 600 of its posters.

Every item text 6 times (a copy number appended, so each text is distinct: 10,092 texts), and
4 distinct JPEGs of each poster (as is, mirrored, cropped 4%, mirrored and cropped: 2,400
images) on the first 2,400 rows. Written to argv[1] in the contract's form.
"""
import csv
import os
import sys
from pathlib import Path

from PIL import Image, ImageOps

src, out = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/ml"), Path(sys.argv[1])
(out / "images").mkdir(parents=True, exist_ok=True)
rows = list(csv.DictReader(open(src / "items.csv", newline="", encoding="utf-8")))[:int(os.environ.get("BIG_ITEMS", 10**9))]
posters = [r["image"] for r in rows if r["image"]][:int(os.environ.get("BIG_POSTERS", 600))]
variants = []
for rel in posters:
    img = Image.open(src / rel).convert("RGB")
    w, h = img.size
    crop = img.crop((int(w * .04), int(h * .04), w - int(w * .04), h - int(h * .04)))
    for k, v in enumerate((img, ImageOps.mirror(img), crop, ImageOps.mirror(crop))):
        name = f"images/{Path(rel).stem}_{k}.jpg"
        v.save(out / name, quality=90)
        variants.append(name)
with open(out / "items.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=["item_id", "title", "description", "tags", "image"])
    w.writeheader()
    n = 0
    for copy in range(int(os.environ.get("BIG_COPIES", 6))):
        for r in rows:
            w.writerow({"item_id": f"{r['item_id']}_{copy}", "title": f"{r['title']} [copy {copy}]",
                        "description": r["description"], "tags": r["tags"],
                        "image": variants[n] if n < len(variants) else ""})
            n += 1
print(f"{n} items, {len(variants)} images -> {out}")
