"""Renders Triton attention kernels specialized to a mask from jinja2 templates."""
