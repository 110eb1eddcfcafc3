"""Triton kernels and their launchers, one file per op family (installed as fastvit.kernels).

Kernels are launched only from the torch.library ops in fastvit/ops/, named by fastvit._library.
"""
