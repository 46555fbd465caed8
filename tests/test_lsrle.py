"""Label Studio brush RLE (``app.integrations.labelstudio.rle``) against the published
reference, bit for bit.

``_ref_encode`` / ``_ref_decode`` are ``label_studio_sdk.converter.brush``'s ``encode_rle`` and
``decode_rle`` (SDK 2.1.2) written out here, so this test needs no Label Studio; the interop
tests compare with the real SDK as well.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.integrations.labelstudio.rle import decode_mask, decode_rle, encode_mask, encode_rle


def _ref_runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = values[1:] != values[:-1]
    i = np.append(np.where(y), len(values) - 1)
    return np.diff(np.append(-1, i)), values[i]


def _ref_encode(
    arr: np.ndarray, wordsize: int = 8, rle_sizes: tuple[int, ...] = (3, 4, 8, 16)
) -> list[int]:
    base = f"{len(arr):032b}" + f"{wordsize - 1:05b}" + "".join(f"{x - 1:04b}" for x in rle_sizes)
    out = ""
    for length, value in zip(*_ref_runs(arr), strict=True):
        if length == 1:
            out += "0" + "00" + "000" + f"{value:08b}"
        elif length <= 8:
            out += "1" + "00" + f"{length - 1:03b}" + f"{value:08b}"
        elif length <= 16:
            out += "1" + "01" + f"{length - 1:04b}" + f"{value:08b}"
        elif length <= 256:
            out += "1" + "10" + f"{length - 1:08b}" + f"{value:08b}"
        else:
            rest = int(length)
            while rest > 2**16:
                out += "1" + "11" + f"{2**16 - 1:016b}" + f"{value:08b}"
                rest -= 2**16
            out += "1" + "11" + f"{rest - 1:016b}" + f"{value:08b}"
    total = base + out
    total += (8 - len(total) % 8) * "0"
    return [int(total[i : i + 8], 2) for i in range(0, len(total), 8)]


def _ref_decode(rle: list[int]) -> np.ndarray:
    bits = "".join(f"{byte:08b}" for byte in rle)
    pos = 0

    def read(size: int) -> int:
        nonlocal pos
        value = int(bits[pos : pos + size], 2)
        pos += size
        return value

    num, word_size = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        x = read(1)
        j = i + 1 + read(sizes[read(2)])
        if x:
            out[i:j] = read(word_size)
            i = j
        else:
            while i < j:
                out[i] = read(word_size)
                i += 1
    return out


def _ref_mask2rle(mask: np.ndarray) -> list[int]:
    return _ref_encode(np.repeat(mask.astype(np.uint8).ravel() * 255, 4))


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    masks = []
    for height, width in [(1, 1), (1, 2), (3, 5), (24, 32), (65, 70), (1, 20000), (300, 220)]:
        yy, xx = np.mgrid[:height, :width]
        masks += [
            np.zeros((height, width), dtype=bool),
            np.ones((height, width), dtype=bool),
            rng.random((height, width)) < 0.2,
            (yy - height / 2) ** 2 + (xx - width / 3) ** 2 <= (min(height, width) / 3) ** 2,
            (xx % 3 == 0) & (yy % 2 == 0),
        ]
    return masks


@pytest.mark.parametrize(
    "mask", _masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}"
)
def test_mask_round_trip_is_bit_exact_with_the_reference(mask: np.ndarray) -> None:
    rle = encode_mask(mask)
    assert rle == _ref_mask2rle(mask)
    assert (decode_rle(rle) == _ref_decode(rle)).all()
    assert (decode_mask(rle, mask.shape[1], mask.shape[0]) == mask).all()


@pytest.mark.parametrize("length", [1, 2, 8, 9, 16, 17, 256, 257, 65536, 65537, 131072, 200001])
def test_run_lengths_at_every_field_boundary(length: int) -> None:
    values = np.concatenate([np.full(length, 255, np.uint8), [0, 7, 7]]).astype(np.uint8)
    rle = encode_rle(values)
    assert rle == _ref_encode(values)
    assert (decode_rle(rle) == values).all()


def _pack(fields: list[tuple[int, int]]) -> list[int]:
    bits = "".join(f"{value:0{width}b}" for value, width in fields)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_decodes_literal_blocks_and_other_layouts_of_the_frontend() -> None:
    """Label Studio's frontend (thi.ng rle-pack) writes literal blocks of many values."""
    header = [(6, 32), (8 - 1, 5), (2 - 1, 4), (5 - 1, 4), (8 - 1, 4), (16 - 1, 4)]
    blocks = [(0, 1), (0, 2), (2, 2), (9, 8), (8, 8), (7, 8)]  # literal: 3 values
    blocks += [(1, 1), (1, 2), (2, 5), (255, 8)]  # a run of 3 x 255
    rle = _pack(header + blocks)
    assert decode_rle(rle).tolist() == [9, 8, 7, 255, 255, 255]
    assert (decode_rle(rle) == _ref_decode(rle)).all()


def test_wide_words_decode() -> None:
    rle = _pack(
        [(2, 32), (16 - 1, 5), (1, 4), (1, 4), (1, 4), (1, 4), (1, 1), (0, 2), (1, 2), (40000, 16)]
    )
    assert decode_rle(rle).tolist() == [40000, 40000]


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ([0, 0, 0], "ends inside"),
        (
            _pack(
                [(5, 32), (7, 5), (2, 4), (3, 4), (7, 4), (15, 4), (1, 1), (0, 2), (7, 3), (1, 8)]
            ),
            "past",
        ),
        ([0, 0, 1, 0, 300], "0..255"),
        ([[1, 2]], "flat list"),
    ],
)
def test_malformed_streams_are_refused(rle: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_rle(rle)


def test_sizes_are_checked_before_allocating() -> None:
    huge = _pack([(2**31, 32), (7, 5), (2, 4), (3, 4), (7, 4), (15, 4)])
    with pytest.raises(ValueError, match="more than"):
        decode_rle(huge)
    rle = encode_mask(np.ones((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="not the expected"):
        decode_mask(rle, 5, 5)
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.ones(3, dtype=bool))
