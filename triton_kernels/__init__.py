"""Triton kernels, one module per op family (kernels and their launch helpers only).

Shipped as ``fusedtech.triton_kernels`` (see setup.py's package_dir), never as a top-level
package: PyPI has an unrelated ``triton_kernels``."""
