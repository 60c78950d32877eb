"""Attention kernels (Triton) beside their plain-PyTorch references; imported as ``nsa_viz.kernels``.

This package depends on torch and triton only: it knows nothing of models or patterns.
"""
from __future__ import annotations

if __name__ == "kernels":
    # Imported under its folder's name only because Python started in the checkout's root. That name is Hugging
    # Face's package, which transformers >= 5.25 imports when it loads: load that package in this one's place.
    from ._hugging_face import stand_aside

    stand_aside()
else:
    from ._public import *  # noqa: F401,F403
    from ._public import __all__  # noqa: F401
