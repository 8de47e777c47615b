"""torch.library custom ops wrapping the Triton launchers, with fake (meta) implementations
and autograd registrations, so eager autograd and `torch.compile(fullgraph=True)` both work.

Imported lazily by `ptuning_fast.ops`: importing this package decorates the Triton kernels,
which must happen after TRITON_INTERPRET is decided.
"""
