"""schemathesis hooks (named in ../schemathesis.toml): real images for the accepted image media types.

`POST /check-image` declares its file part as JPEG, PNG or WebP; without these
schemathesis fills it with any bytes it has (a ZIP sent as image/webp), which
the server rightly refuses.
"""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image

from appliance.contract import IMAGE_FORMATS


def _encode(pil_format: str, size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, pil_format)
    return out.getvalue()


def images(pil_format: str) -> st.SearchStrategy[bytes]:
    """Small single-colour images of one format."""
    side = st.integers(1, 48)
    colour = st.tuples(*(st.integers(0, 255),) * 3)
    return st.builds(_encode, st.just(pil_format), st.tuples(side, side), colour)


for _format in IMAGE_FORMATS.values():
    schemathesis.openapi.media_type(_format.content_type, images(_format.label.upper()))
