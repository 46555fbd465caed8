"""Segmentation: a label is a binary mask of the image's size; readers combine per pixel."""

from __future__ import annotations

from collections.abc import Sequence

from app.errors import InvalidInput
from app.labels.kinds.base import Content, CurrentLabel, Disputed, LabelKind, Read, Submission
from app.labels.masks import decode_png_mask, decode_rle_mask

DEFAULT_CLASSES = ["lesion"]


class Segmentation(LabelKind):
    name = "segmentation"
    default_alpha = 0.5
    ls_control = "BrushLabels"
    own_formats = frozenset({"masks"})
    takes_mask = True

    def checked_classes(self, classes: list[str] | None) -> list[str]:
        classes = classes or list(DEFAULT_CLASSES)
        if len(classes) != 1:
            raise InvalidInput(
                "A segmentation project has one foreground class (masks are binary)."
            )
        return classes

    def content(self, submitted: Submission) -> Content:
        if submitted.has_class:
            raise InvalidInput(
                f"Project {submitted.project_id} is a segmentation project; send a mask, not "
                "a class.",
                code="ClassNotAllowed",
            )
        expected = (submitted.height, submitted.width)
        if submitted.decoded is not None:
            shape = submitted.decoded.shape
            if shape != expected:
                raise InvalidInput(
                    f"The mask is {shape[1]}x{shape[0]} (width x height) but the image is "
                    f"{expected[1]}x{expected[0]}.",
                    code="MaskSizeMismatch",
                )
            return Content(mask=submitted.decoded)
        if submitted.mask_png is not None:
            return Content(mask=decode_png_mask(submitted.mask_png, expected))
        if submitted.mask_rle is not None:
            return Content(mask=decode_rle_mask(submitted.mask_rle, expected))
        raise InvalidInput(
            "A segmentation label needs a mask: a PNG file field 'mask' or mask_rle.",
            code="MaskRequired",
        )

    def combine(self, latest: Sequence[Read]) -> CurrentLabel | Disputed:
        """The per-pixel majority of the reads' masks, combined where the masks are read (the
        review queue holds the images whose readers' Dice is under the project's threshold)."""
        keys = tuple(r.mask_key for r in latest if r.mask_key)
        ids = tuple(r.label_id for r in latest)
        return CurrentLabel(latest[0].image_id, None, keys, ids, "agreed")
