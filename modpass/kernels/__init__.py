"""Hand-written Triton kernels for the steps Inductor's generic lowerings leave slow.

Each kernel has a plain-torch reference it must equal bit for bit; the
routing functions call the kernel only where it runs (a CUDA tensor and a
working Triton) and the reference everywhere else.
"""
