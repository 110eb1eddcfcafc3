"""The CUDA backend: C++/CUDA sources (torch-free kernels per family, bindings.cpp), shipped as
package data, and per family the Python side of its ops (``fastvit.csrc.<family>``: fakes, autograd).

fastvit._ext builds the sources on first use and then imports the family modules; importing one of
them first loads (and if needed builds) the extension.
"""
