"""Compiled kernels behind samplers (imported lazily by the samplers that use them).

``negbench.kernels.emc2``: the fused EMC² sweep — a small C library (built with the system C
compiler at first use, cached in the user cache folder, loaded with ctypes) on the CPU and a
Triton kernel on CUDA. The reference in tensor code (PyTorch; NumPy on the CPU) stays in
``negbench.samplers.emc2``.
"""
