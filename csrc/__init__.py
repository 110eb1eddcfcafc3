"""CUDA C++ sources (torch-free kernels per family, bindings.cpp), shipped as package data.

fastvit._ext builds them on first use; this file only makes the folder importable as fastvit.csrc
so that its location is found the same way from an editable install and from a wheel.
"""
