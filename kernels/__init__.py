"""p2ptrain.kernels: tensor numerics (installed as ``p2ptrain.kernels``).

- ``_codec.py``  the Codec interface, wire dtypes
"""

from __future__ import annotations

from p2ptrain.kernels._codec import DTYPES, Codec, Encoded, dtype_from_name, dtype_name

__all__ = ["DTYPES", "Codec", "Encoded", "dtype_from_name", "dtype_name"]
