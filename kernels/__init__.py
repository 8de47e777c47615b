"""Triton kernels and their launchers (installed as `ptuning_fast.kernels`).

Only allocation, grids, strides and block sizes live here: no autograd, no transformers.
Import a kernel module only after deciding on TRITON_INTERPRET: Triton reads it when the
kernels are decorated.
"""
