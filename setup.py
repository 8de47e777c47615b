# Metadata lives in pyproject.toml. This file is kept for tools that still call it, and because
# the package list combines discovery (ptuning_fast.*) with the kernels/ folder mapped to
# ptuning_fast.kernels (see [tool.setuptools.package-dir]), which pyproject alone cannot express.
from setuptools import find_packages, setup

setup(packages=find_packages(include=["ptuning_fast", "ptuning_fast.*"]) + ["ptuning_fast.kernels"])
