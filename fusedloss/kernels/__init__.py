"""Fused Triton kernels. Nothing here is imported by ``import fusedloss``: the dispatch rule in
:mod:`fusedloss._dispatch` imports a family's module the first time it runs that kernel, so
``TRITON_INTERPRET=1`` only has to be set before that first use."""
