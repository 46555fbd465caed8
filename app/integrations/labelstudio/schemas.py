"""What Label Studio sends to an ML backend (``/ls/*``) and what coreloop answers.

Label Studio's payloads carry many more fields than these; the extra ones are ignored. Its
labeling config (XML) is parsed here into the few facts coreloop needs: which ``<Choices>`` or
``<BrushLabels>`` control labels which ``<Image>``, and with which values.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

IMAGE_ID_KEY = "coreloop_image_id"
_IMAGE_PATH = re.compile(r"(?:^|/)images/(\d+)/file/?$")


def as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    return None


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LsSetupRequest(_Lenient):
    """``POST /setup``: ``project`` is ``"<id>.<created timestamp>"``, ``schema`` the config."""

    project: str | None = None
    label_schema: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    extra_params: dict[str, Any] | None = None


class LsSetupResponse(BaseModel):
    model_version: str


class LsTask(_Lenient):
    id: int
    data: dict[str, Any] = Field(default_factory=dict)
    project: int | None = None

    def coreloop_image_id(self) -> int | None:
        """The coreloop image shown: ``data.coreloop_image_id``, else one of our file URLs.

        A URL counts when its path ends in ``/images/{id}/file`` (absolute or relative; any
        host, so a proxy prefix works); ``data.image`` is tried first, then every value.
        """
        explicit = as_id(self.data.get(IMAGE_ID_KEY))
        if explicit is not None:
            return explicit
        for value in (self.data.get("image"), *self.data.values()):
            if isinstance(value, str):
                match = _IMAGE_PATH.search(urlsplit(value.strip()).path)
                if match:
                    return int(match.group(1))
        return None


class LsPredictRequest(_Lenient):
    """``POST /predict``: every selected task in one request."""

    tasks: list[LsTask]
    project: str | None = None
    label_config: str | None = None


class LsPrediction(BaseModel):
    """One task's prediction; ``result`` holds Label Studio result regions."""

    result: list[dict[str, Any]]
    score: float
    model_version: str


class LsPredictResponse(BaseModel):
    results: list[LsPrediction]


@dataclass(frozen=True)
class LsBrush:
    """One brush region of an annotation: Label Studio RLE of a width x height RGBA layer."""

    rle: list[int]
    width: int
    height: int
    labels: tuple[str, ...]


class LsAnnotation(_Lenient):
    id: int
    result: list[dict[str, Any]] = Field(default_factory=list)
    completed_by: int | dict[str, Any] | None = None
    was_cancelled: bool = False
    created_at: str | None = None
    updated_at: str | None = None
    task: int | None = None

    def author_name(self) -> str:
        """``ls:<email>`` when Label Studio sent the user, else ``ls:<user id>``."""
        who = self.completed_by
        if isinstance(who, dict):
            who = who.get("email") or who.get("id")
        return f"ls:{who}" if who not in (None, "") else "ls:unknown"

    def member_names(self) -> list[str]:
        """The coreloop user names that may stand for the Label Studio user, best first:
        the e-mail, ``ls:<e-mail>``, ``ls:<user id>`` (as far as Label Studio sent them)."""
        who = self.completed_by
        email, user_id = (who.get("email"), who.get("id")) if isinstance(who, dict) else (None, who)
        names = []
        if isinstance(email, str) and email.strip():
            names += [email.strip(), f"ls:{email.strip()}"]
        if user_id not in (None, "") and not isinstance(user_id, bool | dict | list):
            names.append(f"ls:{user_id}")
        return names

    def idempotency_key(self) -> str:
        """One label per version of the annotation: a redelivery stores nothing new."""
        return f"ls-annotation-{self.id}-{self.updated_at or self.created_at or ''}"[:200]

    def choices(self) -> list[list[str]]:
        """The picked values of each ``choices`` region."""
        picked = []
        for region in self.result:
            value = region.get("value")
            if region.get("type") == "choices" and isinstance(value, dict):
                picked.append([str(c) for c in value.get("choices") or []])
        return picked

    def picked_class(self, classes: list[str]) -> str | None:
        """The one picked choice, preferring a region whose value is one of ``classes``
        (another control may sit beside the class); ``ValueError`` for a multiple choice."""
        picked = [choices for choices in self.choices() if choices]
        single = [choices[0] for choices in picked if len(choices) == 1]
        if picked and not single:
            raise ValueError(f"annotation {self.id} picks several choices {picked[0]}")
        return next((c for c in single if c in classes), single[0] if single else None)

    def brushes(self) -> list[LsBrush]:
        """The ``brushlabels`` regions; ``ValueError`` for one not in RLE format."""
        found = []
        for region in self.result:
            value = region.get("value")
            if region.get("type") != "brushlabels":
                continue
            if not isinstance(value, dict) or not isinstance(value.get("rle"), list):
                raise ValueError("a brushlabels region without an RLE list in value.rle")
            if value.get("format", "rle") != "rle":
                raise ValueError(f"brush format {value.get('format')!r} is not read; use rle")
            found.append(
                LsBrush(
                    rle=value["rle"],
                    width=int(region.get("original_width") or 0),
                    height=int(region.get("original_height") or 0),
                    labels=tuple(str(v) for v in value.get("brushlabels") or []),
                )
            )
        return found

    def has_brush(self) -> bool:
        return any(region.get("type") == "brushlabels" for region in self.result)


class LsAnnotationEvent(_Lenient):
    """An ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` webhook: one annotation, its task."""

    action: str
    annotation: LsAnnotation
    task: LsTask


class LsWebhookAck(BaseModel):
    """The webhook's answer (Label Studio ignores it; it tells a person reading logs)."""

    action: str
    status: str  # "recorded", "replayed", "queued", "ignored"
    label_id: int | None = None
    detail: str | None = None


@dataclass(frozen=True)
class LsControl:
    """A labeling control: its ``name`` (``from_name``), the image it labels, its values."""

    tag: str  # "Choices" or "BrushLabels"
    name: str
    to_name: str
    values: tuple[str, ...]

    def _region(self, region_id: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": region_id,
            "from_name": self.name,
            "to_name": self.to_name,
            "type": kind,
            "value": value,
        }

    def choice_region(self, region_id: str, choice: str, score: float) -> dict[str, Any]:
        """A ``choices`` result region picking ``choice``."""
        return {**self._region(region_id, "choices", {"choices": [choice]}), "score": score}

    def brush_region(
        self, region_id: str, rle: list[int], width: int, height: int, label: str
    ) -> dict[str, Any]:
        """A ``brushlabels`` result region: a Label Studio RLE of a width x height layer."""
        value = {"format": "rle", "rle": rle, "brushlabels": [label]}
        size = {"original_width": width, "original_height": height, "image_rotation": 0}
        return {**self._region(region_id, "brushlabels", value), **size}


@dataclass(frozen=True)
class LsLabelConfig:
    """The parts of a Label Studio labeling config that coreloop reads."""

    images: dict[str, str]  # Image tag name -> its data key ("$image" -> "image")
    controls: tuple[LsControl, ...]

    def control(self, tag: str) -> LsControl | None:
        """The first ``tag`` control that labels an ``<Image>``."""
        return next((c for c in self.controls if c.tag == tag and c.to_name in self.images), None)

    def mismatch(self, tag: str, classes: list[str]) -> str | None:
        """Why coreloop could not fill in or read back this config, or None.

        ``tag``: the control the project needs (``Choices`` for classification, whose values
        must hold every class; ``BrushLabels`` for segmentation, any label).
        """
        control = self.control(tag)
        if control is None:
            return f"the labeling config needs a <{tag}> control whose toName is an <Image>"
        missing = [c for c in classes if c not in control.values]
        if tag == "Choices" and missing:
            return (
                f"the <Choices name={control.name!r}> control lacks the classes {missing}; "
                f"add a <Choice value=...> for each of {classes}"
            )
        return None

    @classmethod
    def parse(cls, xml: str | None) -> LsLabelConfig:
        """Parse ``xml``; an empty or unreadable config gives an empty result."""
        if not xml or not xml.strip():
            return cls({}, ())
        try:
            root = ElementTree.fromstring(xml)
        except ElementTree.ParseError:
            return cls({}, ())
        images = {
            el.get("name", ""): el.get("value", "").lstrip("$")
            for el in root.iter("Image")
            if el.get("name")
        }
        controls = tuple(
            LsControl(
                tag=el.tag,
                name=el.get("name", ""),
                to_name=_first_image(el.get("toName", ""), images),
                values=tuple(
                    child.get("value", "") for child in el if child.tag in ("Choice", "Label")
                ),
            )
            for el in root.iter()
            if el.tag in ("Choices", "BrushLabels") and el.get("name")
        )
        return cls(images, controls)


def _first_image(to_name: str, images: dict[str, str]) -> str:
    names = [name.strip() for name in to_name.split(",") if name.strip()]
    return next((name for name in names if name in images), names[0] if names else "")
