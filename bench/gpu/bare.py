"""Device only: run a repo script with `fusionrec` as a bare package (its __init__ imports FAISS
and LightGBM, which the device image lacks and the embedding job does not use), with a stand-in
for FAISS, which the job's table reading imports at module level."""
import importlib.util
import os
import runpy
import sys
import types

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/gpu/ -> the repository
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


class _Missing(types.ModuleType):
    """Stands in for a library the device image lacks and the embedding job never calls
    (the package imports FAISS at module level): importing works, using it says why not."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__} is not installed on this machine (bench/gpu/bare.py stands in for it)")


stub = {m for m in os.environ.get("BARE_STUB", "").split(",") if m}  # rehearsal here: "faiss"
for name in ("faiss",):
    if name in stub or importlib.util.find_spec(name) is None:
        sys.modules[name] = _Missing(name)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
