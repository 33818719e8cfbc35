"""Element types of stored tables and conversions of user data to them.

bf16 is stored as its raw bits in a little-endian ``uint16`` zarr array (zarr 3.1
and numpy have no bfloat16 type); the table's attributes say ``"dtype": "bf16"``.
:meth:`TableStore.gather` returns those ``uint16`` bits (itemsize 2); turn them into
numbers with :func:`bf16_bits_to_float32` or, in torch,
``torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)``. Writers accept the
bits, a ``torch.bfloat16`` tensor, or floats (rounded to nearest even).
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np


class StoreDType(enum.Enum):
    """Element type of a table's rows."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def numpy(self) -> np.dtype[Any]:
        """The little-endian numpy dtype of the stored elements (bf16: its uint16 bits)."""
        return np.dtype({"fp32": "<f4", "fp16": "<f2", "bf16": "<u2"}[self.value])

    @property
    def itemsize_bytes(self) -> int:
        return self.numpy.itemsize


class OptimizerState(enum.Enum):
    """Per-row optimizer state kept beside a table's weights (always fp32)."""

    ROWWISE_ADAGRAD = "rowwise_adagrad"

    def width(self, dim: int) -> int:
        """State values per row: row-wise Adagrad keeps one sum of squared gradients."""
        del dim
        return 1


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 (nearest, ties to even) and return the uint16 bits.

    NaNs stay NaN (quiet); infinities and overflow give infinities, as in torch.
    """
    f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bits (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def is_torch_tensor(value: object) -> bool:
    """True for a torch tensor, without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU numpy copy/view of a torch tensor; bfloat16 comes back as its uint16 bits."""
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def to_stored(values: Any, dtype: StoreDType) -> np.ndarray | str:
    """Convert user values to the stored element type.

    Returns the converted array, or a one-line problem description (the caller
    raises its own typed error with the table name).
    """
    is_bf16_tensor = False
    if is_torch_tensor(values):
        is_bf16_tensor = str(values.dtype) == "torch.bfloat16"
        values = torch_to_numpy(values)
    array = np.asarray(values)
    kind = array.dtype.kind
    if dtype is StoreDType.BF16:
        if array.dtype == np.uint16 or is_bf16_tensor:
            return array.astype("<u2", copy=False)
        if kind == "f":
            return float32_to_bf16_bits(array)
        return (f"bf16 rows must be floats, torch.bfloat16 or uint16 bf16 bits, "
                f"got dtype {array.dtype}")
    if kind != "f":
        return f"{dtype.value} rows must be floating point, got dtype {array.dtype}"
    with np.errstate(over="ignore"):
        return array.astype(dtype.numpy, copy=False)
