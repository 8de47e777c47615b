"""Triton kernels and their launchers (installed as `ptuning_fast.kernels`).

Only allocation, grids, strides and block sizes live here: no autograd, no transformers.
Import a kernel module only after deciding on TRITON_INTERPRET: Triton reads it when the
kernels are decorated.
"""
if __name__ == "kernels":
    # Imported by its folder name because the repo root is on sys.path (a script, `python -c`
    # or `python -m pytest` run from the root). That name belongs to Hugging Face's `kernels`
    # package, which transformers (>= 5.25) imports at `from transformers import ...`: hand the
    # import to it, or fail as if this folder were not there. (A folder without __init__.py
    # would rank below the real package by itself, but setuptools' editable finder cannot
    # map a namespace folder to ptuning_fast.kernels.)
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError(
            "No module named 'kernels' (the folder kernels/ in this repo is ptuning_fast.kernels; "
            "import it by that name)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds
    _spec.loader.exec_module(_module)
