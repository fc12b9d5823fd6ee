"""Reading images for encoding: paths (or PIL images already open) → decoded PIL images."""

from __future__ import annotations

from typing import Sequence

from embedtrain.errors import EmbedtrainError


def load_images(items: Sequence) -> list:
    """PIL images for ``items`` (file paths or PIL images); a file that cannot be read is one error line."""
    from PIL import Image

    images = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item)
            continue
        try:
            image = Image.open(item)
            image.load()
        except FileNotFoundError:
            raise EmbedtrainError(f"image {item}: not found; check the path") from None
        except Exception as err:  # PIL raises many types for broken files
            raise EmbedtrainError(f"image {item}: cannot be decoded ({err.__class__.__name__}); "
                                  "replace or remove the file") from None
        images.append(image)
    return images
