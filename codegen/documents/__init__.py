"""Kernels for masks whose shape arrives with each call: packed documents (maskdsl.spec.documents)."""
