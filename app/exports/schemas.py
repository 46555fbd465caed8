"""Schemas of label import files (Label Studio tasks, COCO) and of the import result.

Only the fields the importer reads are declared; everything else in a file is ignored, so
files written by Label Studio or other COCO tools load as well as our own exports.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ExportFormat = Literal["ls", "coco", "csv", "masks"]
# The ``source`` of an exported consensus (several readers): derived, so never imported.
CONSENSUS = "consensus"
ImportFormat = Literal["ls", "coco", "csv", "masks"]

CSV_COLUMNS = (
    "image_id",
    "filename",
    "sha256",
    "class_index",
    "class_name",
    "author",
    "source",
    "created_at",
)
MANIFEST_COLUMNS = (
    "image_id",
    "filename",
    "sha256",
    "label_id",
    "mask",
    "author",
    "source",
    "created_at",
)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LsValue(_Lenient):
    choices: list[str] | None = None
    brushlabels: list[str] | None = None
    format: str | None = None
    rle: list[int] | None = None


class LsResult(_Lenient):
    type: str
    value: LsValue
    original_width: int | None = None
    original_height: int | None = None


class LsAnnotation(_Lenient):
    result: list[LsResult] = Field(default_factory=list)
    was_cancelled: bool = False
    coreloop_source: str | None = None


class LsTask(_Lenient):
    data: dict[str, Any] = Field(default_factory=dict)
    annotations: list[LsAnnotation] = Field(default_factory=list)


class CocoImage(_Lenient):
    id: int
    file_name: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    coreloop_image_id: int | None = None


class CocoCategory(_Lenient):
    id: int
    name: str


class CocoAnnotation(_Lenient):
    image_id: int
    category_id: int
    coreloop_source: str | None = None
    # A COCO RLE ({"size", "counts"}), polygons ([[x, y, ...], ...]), or nothing (a class).
    segmentation: dict[str, Any] | list[list[float]] | None = None


class CocoFile(_Lenient):
    images: list[CocoImage]
    categories: list[CocoCategory] = Field(default_factory=list)
    annotations: list[CocoAnnotation] = Field(default_factory=list)


class ImportResult(BaseModel):
    """What an import did: labels stored, labels already there, entries with no image."""

    format: ImportFormat
    labels_in_file: int
    created: int
    unchanged: int
    unmatched: int
    unmatched_examples: list[str]
