"""Triton kernels of diffcore (shipped as ``diffcore.kernels``), one module per op.

Importing a module here imports triton. On a machine without a GPU, Triton kernels run in the
interpreter on CPU tensors, which needs ``TRITON_INTERPRET=1`` set before triton is imported.
"""
