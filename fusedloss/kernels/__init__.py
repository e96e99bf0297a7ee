"""Fused Triton kernels, one module per family, every module built to one contract.

Nothing here is imported by ``import fusedloss``: a loss imports its family's module inside the
branch that runs the kernel, so ``TRITON_INTERPRET=1`` only has to be set before that first use.

The contract, top to bottom (``<fam>`` is the family: ``sp``, ``dqn``, ``vec_dqn``, ``rope``)::

    _<fam>_fwd_kernel, _<fam>_bwd_kernel   @triton.jit; pointers end in _ptr, strides start with
                                            stride_, compile-time flags are UPPER_CASE constexprs;
                                            a body longer than a screen is split into jit helpers
    <fam>_fwd(...), <fam>_bwd(...)          launchers: tiles, grid, output buffers; tensors in,
                                            tensors out (tests pass NaN-filled buffers through
                                            the optional *_out arguments)
    fusedloss::<fam>_fwd, ::<fam>_bwd       torch.library custom ops with a fake (meta) impl; the
                                            forward op carries register_autograd, so
                                            torch.compile(fullgraph=True) traces the whole path
    <fam>_fused(...)                        the one entry its loss calls: plain tensors and Python
                                            scalars, never a config object
    compile_variants()                      the (kernel, signature, constexprs, warps) sets the
                                            launchers pick, for the ahead-of-time spill check
                                            (tests/compile_check.py)
    HOT_TILES                               each kernel's tile (the constexprs whose product is
                                            the elements one loop iteration covers), for the
                                            SASS instructions per element

``aot`` is not a family: it compiles the variants (or a recorded launch) for sm_90 with no GPU and
reads registers, spills, occupancy and SASS counts, for ``tests/compile_check.py`` and
``bench/model.py``.

Who does what:

- The loss (``fusedloss/losses/<fam>.py``) validates the inputs, reduces, and builds the metrics,
  each once; it picks the path with :func:`fusedloss._dispatch.resolve_backend`. Kernels import
  nothing from ``losses/``.
- ``<fam>_fused`` detaches what gets no gradient and rejects ``torch.func`` gradient transforms;
  the launcher (marked ``@launcher``, which serializes launches under the interpreter) copies an
  input only when its last dimension is not contiguous.
- The stored forward gradient is in the input dtype, fp32 for fp16 (``stored_grad_dtype``); a
  backward op that is not differentiable says so (``no_double_backward``).
- NaN in, NaN out: GPU ``tl.maximum``/``tl.minimum`` and ``tl.max`` skip NaN (the interpreter
  does not), so values that may carry one go through ``_common.nanmax``/``nanmin``, and a
  reduction that must see a NaN adds a probe sum; running logsumexps use
  ``_common.online_lse_update``.
- Per-row results come back per row and the loss reduces them (sp, vec_dqn). A kernel computes
  a reduction itself only where it is part of the one pass (dqn's masked mean and metrics: each
  program stores a row of partials, which a one-program fold launch reduces in row order).
- Output slots and loss codes are ``IntEnum`` s, mirrored for the kernels by
  :func:`constexpr_namespace`, so the kernel, the host and the tests read one table.
"""
