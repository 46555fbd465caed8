"""Label Studio's brush RLE, in pure NumPy (not COCO RLE: a bit-packed format of its own).

Label Studio stores a brush region as the run-length encoding of the RGBA pixels of a
``width x height`` layer (``width * height * 4`` bytes, row-major), the mask in the alpha
channel. The format is thi.ng's ``rle-pack``; ``label_studio_sdk.converter.brush`` has the
Python reference (``encode_rle`` / ``mask2rle`` / ``decode_rle``), which this module ports:

- header: value count (32 bits), word size - 1 (5 bits), four run-length field sizes - 1
  (4 bits each);
- then blocks: one flag bit (1: a run of one repeated value, 0: literal values), 2 bits that
  pick one of the four field sizes, the block length - 1 in that many bits, then one value
  (run) or that many values (literal), each ``word size`` bits;
- zero bits pad the end to whole bytes: the reference always adds ``8 - len % 8`` bits, so a
  stream that is already whole gets one more zero byte; ``encode_rle`` does the same, byte
  for byte.

The encoder writes what the reference writes (word size 8, field sizes 3, 4, 8, 16; a single
value as a literal block, longer runs as runs, runs past 65,536 split). The decoder reads any
valid stream (Label Studio's frontend picks other block layouts) and refuses malformed ones
with ``ValueError`` instead of reading or writing out of bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
CHANNELS = 4  # RGBA; the mask is the alpha channel
MAX_VALUES = 1 << 28  # what decode_rle allocates at most unless told an exact length
_MAX_RUN = 1 << 16


def _header(count: int) -> str:
    sizes = "".join(f"{size - 1:04b}" for size in RLE_SIZES)
    return f"{count:032b}{WORD_SIZE - 1:05b}{sizes}"


def _runs(values: NDArray[np.uint8]) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """Run lengths and run values of a 1-D array (``base_rle_encode`` of the reference)."""
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths.astype(np.int64), values[ends]


def _block(length: int, value: int) -> str:
    """The bits of one run of ``length`` (>= 1) copies of ``value``."""
    if length == 1:
        return f"000000{value:08b}"  # a literal block of one value, length field 0 (3 bits)
    if length <= 8:
        return f"100{length - 1:03b}{value:08b}"
    if length <= 16:
        return f"101{length - 1:04b}{value:08b}"
    if length <= 256:
        return f"110{length - 1:08b}{value:08b}"
    full, rest = divmod(length, _MAX_RUN)
    if rest == 0:  # the reference splits while more than 65,536 remain
        full, rest = full - 1, _MAX_RUN
    return f"111{_MAX_RUN - 1:016b}{value:08b}" * full + f"111{rest - 1:016b}{value:08b}"


def encode_rle(values: NDArray[np.uint8] | Sequence[int]) -> list[int]:
    """Label Studio RLE bytes of 8-bit ``values`` (flattened), as the reference writes them."""
    array = np.asarray(values).ravel()
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError("Label Studio RLE holds 8-bit values (0..255)")
    array = array.astype(np.uint8)
    bits = [_header(int(array.size))]
    if array.size:
        lengths, run_values = _runs(array)
        bits += [_block(int(n), int(v)) for n, v in zip(lengths, run_values, strict=True)]
    stream = "".join(bits)
    stream += "0" * (8 - len(stream) % 8)
    packed = np.packbits(np.frombuffer(stream.encode("ascii"), dtype=np.uint8) - ord("0"))
    return [int(byte) for byte in packed]


def encode_mask(mask: NDArray[np.bool_]) -> list[int]:
    """The brush RLE of a 2-D boolean mask (``mask2rle`` of the mask as 0/255 values)."""
    if mask.ndim != 2:
        raise ValueError(f"a mask is 2-D (height, width); got shape {mask.shape}")
    values = np.where(mask, 255, 0).astype(np.uint8).ravel()
    return encode_rle(np.repeat(values, CHANNELS))


class _Bits:
    """Reads unsigned big-endian integers from a bit string, refusing to read past the end."""

    def __init__(self, data: bytes) -> None:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self._text = (bits + ord("0")).tobytes().decode("ascii")
        self._pos = 0

    def read(self, size: int) -> int:
        end = self._pos + size
        if end > len(self._text):
            raise ValueError("the RLE stream ends inside a block")
        value = int(self._text[self._pos : end], 2) if size else 0
        self._pos = end
        return value


def _as_bytes(rle: Sequence[int]) -> bytes:
    array = np.asarray(rle)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError("Label Studio RLE is a flat list of byte values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError("Label Studio RLE holds byte values (0..255)")
    return array.astype(np.uint8).tobytes()


def decode_rle(
    rle: Sequence[int], length: int | None = None, max_length: int = MAX_VALUES
) -> NDArray[np.uint32]:
    """The values of a Label Studio RLE stream (``decode_rle`` of the reference).

    ``length``: the value count the caller expects (checked before anything is allocated);
    without it, at most ``max_length`` values are accepted.
    """
    bits = _Bits(_as_bytes(rle))
    count = bits.read(32)
    if length is not None and count != length:
        raise ValueError(f"the RLE holds {count} values, not the expected {length}")
    if count > max_length:
        raise ValueError(f"the RLE holds {count} values, more than {max_length}")
    word_size = bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint32)
    i = 0
    while i < count:
        is_run = bits.read(1)
        j = i + 1 + bits.read(sizes[bits.read(2)])
        if j > count:
            raise ValueError(f"a block runs past the {count} values the RLE declares")
        if is_run:
            out[i:j] = bits.read(word_size)
        else:
            out[i:j] = [bits.read(word_size) for _ in range(j - i)]
        i = j
    return out


def decode_mask(rle: Sequence[int], width: int, height: int) -> NDArray[np.bool_]:
    """A ``(height, width)`` boolean mask: the RGBA layer's alpha channel, on where >= 128."""
    values = decode_rle(rle, length=width * height * CHANNELS)
    alpha = values.reshape(height, width, CHANNELS)[:, :, 3]
    return np.asarray(alpha >= 128)
