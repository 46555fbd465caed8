"""Synthetic dermoscopy-like images with masks, for trying the software without a data set.

Not medical data: a skin-toned background with texture, one lesion per image whose shape,
colour and border irregularity depend on its class. Clearly labelled synthetic wherever used.
Pure numpy + Pillow (the API side never imports torch).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SYNTHETIC_CLASSES = ("nevus", "melanoma", "keratosis")

# Per class: mean lesion RGB, radius range (fraction of the image), border irregularity.
_CLASS_LOOK = {
    "nevus": ((120, 75, 50), (0.18, 0.28), 0.05),
    "melanoma": ((55, 35, 35), (0.22, 0.36), 0.30),
    "keratosis": ((150, 115, 80), (0.16, 0.30), 0.15),
}


@dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # uint8 [H, W] in {0, 255}
    class_name: str


def render_lesion(rng: np.random.Generator, class_name: str, size: int = 96) -> SyntheticSample:
    """One synthetic lesion image of ``class_name`` with its binary mask."""
    colour, (r_lo, r_hi), irregular = _CLASS_LOOK[class_name]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    skin = np.array([225, 180, 150], np.float32) + rng.normal(0, 12) + rng.normal(0, 4, 3)
    image = np.broadcast_to(skin, (size, size, 3)).copy()
    image += rng.normal(0, 6, (size, size, 1))  # skin texture
    cy, cx = rng.uniform(0.35, 0.65, 2)
    radius = rng.uniform(r_lo, r_hi)
    angle = np.arctan2(yy - cy, xx - cx)
    phases = rng.uniform(0, 2 * np.pi, 3)
    wobble = sum(np.sin(k * angle + p) for k, p in zip((3, 5, 7), phases, strict=True))
    border = radius * (1 + irregular * wobble / 3)
    dist = np.hypot(yy - cy, xx - cx)
    mask = dist < border
    shade = np.array(colour, np.float32) + rng.normal(0, 10, 3)
    blend = np.clip((border - dist) / (0.25 * radius), 0, 1)[..., None] * 0.9
    image = image * (1 - blend) + shade * blend
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return SyntheticSample(image, (mask * 255).astype(np.uint8), class_name)


def write_synthetic_dataset(
    out_dir: Path, n_images: int = 300, size: int = 96, seed: int = 0
) -> Path:
    """Write a HAM10000-style folder: ``images/<id>.jpg``, ``masks/<id>_segmentation.png``
    and ``metadata.csv`` (``lesion_id,image_id,dx``). Returns the CSV path; idempotent."""
    csv_path = out_dir / "metadata.csv"
    if csv_path.exists():
        return csv_path
    rng = np.random.default_rng(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        class_name = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
        sample = render_lesion(rng, class_name, size)
        image_id = f"SYN_{i:05d}"
        Image.fromarray(sample.image).save(out_dir / "images" / f"{image_id}.jpg", quality=92)
        Image.fromarray(sample.mask).save(out_dir / "masks" / f"{image_id}_segmentation.png")
        rows.append({"lesion_id": f"SYNL_{i:05d}", "image_id": image_id, "dx": class_name})
    tmp = csv_path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["lesion_id", "image_id", "dx"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(csv_path)
    return csv_path
