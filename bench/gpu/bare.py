"""Device only: run a repo script with `fusionrec` as a bare package (its __init__ imports FAISS
and LightGBM, which the device image lacks and the embedding job does not use)."""
import os
import runpy
import sys
import types

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pkg = types.ModuleType("fusionrec")
pkg.__path__ = [root]
pkg.__version__ = "device"
sys.modules["fusionrec"] = pkg
block = {m for m in os.environ.get("BARE_BLOCK", "").split(",") if m}  # rehearsal here: what the device lacks


class _Block:  # found (so find_spec says "there"), but importing it fails as a missing module would
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in block:
            import importlib.machinery
            return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked (rehearsing the device)")

    def exec_module(self, module):
        pass


if block:
    sys.meta_path.insert(0, _Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
