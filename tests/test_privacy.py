"""Lossless metadata stripping (appliance/privacy.py) on real PIL-made JPEG, PNG and WebP bytes."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import ExifTags, Image, JpegImagePlugin, PngImagePlugin

from appliance.app import create_app
from appliance.keys import STORE
from appliance.privacy import MetadataError, strip_metadata

from .conftest import encode, photo
from .test_api import check

ORIENTATION, MAKE, MODEL = 0x0112, 0x010F, 0x0110
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><exif:GPSLatitude>52,22.5N</exif:GPSLatitude></x:xmpmeta>'


def gps_exif(orientation: int | None = 6) -> Image.Exif:
    """EXIF as a phone writes it: maker, model, a GPS position, and (usually) a rotation."""
    exif = Image.Exif()
    exif[MAKE] = "Google"
    exif[MODEL] = "Pixel 7"
    if orientation is not None:
        exif[ORIENTATION] = orientation
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 30.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 12.25)
    return exif


def open_image(data: bytes) -> Image.Image:
    # JPEGs as plain JPEGs: Image.open would try (and warn about) the fake MPF header.
    if data.startswith(b"\xff\xd8"):
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    return Image.open(io.BytesIO(data))


def pixels(data: bytes) -> np.ndarray:
    with open_image(data) as im:
        return np.asarray(im.convert("RGB"))


def exif_of(data: bytes) -> dict[int, Any]:
    with open_image(data) as im:
        exif = im.getexif()
        return {**dict(exif), "gps": dict(exif.get_ifd(ExifTags.IFD.GPSInfo))}


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of every segment before the first SOS."""
    out, pos = [], 2
    while data[pos + 1] != 0xDA:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        out.append((marker, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
    return out


def jpeg_scan(data: bytes) -> bytes:
    """Everything from the first SOS through the primary image's EOI."""
    return data[data.index(b"\xff\xda") : data.rindex(b"\xff\xd9") + 2]


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def phone_jpeg(orientation: int | None = 6) -> bytes:
    """A JPEG carrying EXIF with GPS, XMP, a comment, an ICC profile, IPTC, MPF and a trailing second image."""
    icc = b"\x00\x00\x00\x18fake-icc-profile-bytes!!"
    data = encode(photo(160, 120, seed=1), "JPEG", exif=gps_exif(orientation), xmp=XMP, comment=b"patient 4711",
                  icc_profile=icc)
    # IPTC (Photoshop APP13) and MPF (APP2) after the APP0, as cameras put them.
    extra = segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x0cCity: Leiden") + segment(
        0xE2, b"MPF\x00MM\x00*\x00\x00\x00\x08"
    )
    app0_end = 2 + 2 + struct.unpack_from(">H", data, 4)[0]
    # Multi-picture phones append secondary images after EOI, each with its own EXIF.
    trailer = encode(photo(32, 24, seed=2), "JPEG", exif=gps_exif())
    return data[:app0_end] + extra + data[app0_end:] + trailer


def test_jpeg_loses_location_device_and_text_but_not_pixels() -> None:
    original = phone_jpeg()
    assert b"Pixel 7" in original and XMP in original and b"patient 4711" in original
    stripped = strip_metadata(original, "jpeg")
    for needle in (b"Pixel 7", b"Google", XMP, b"patient 4711", b"Leiden", b"MPF\x00", b"http://ns.adobe.com"):
        assert needle not in stripped
    assert exif_of(stripped) == {ORIENTATION: 6, "gps": {}}
    assert np.array_equal(pixels(stripped), pixels(original))
    assert jpeg_scan(stripped) == jpeg_scan(original[: original.index(b"\xff\xd9\xff\xd8") + 2])
    assert stripped.endswith(b"\xff\xd9") and stripped.count(b"\xff\xd8") == 1  # the trailer is gone
    markers = [m for m, _ in jpeg_segments(stripped)]
    kept = [(m, p) for m, p in jpeg_segments(original) if m not in (0xE1, 0xED, 0xFE) and not p.startswith(b"MPF")]
    # Everything else (APP0, ICC profile, tables, frame header) is there byte for byte, in order.
    assert [(m, p) for m, p in jpeg_segments(stripped) if m != 0xE1] == kept
    assert markers.count(0xE1) == 1 and any(p.startswith(b"ICC_PROFILE\x00") for _, p in jpeg_segments(stripped))
    assert strip_metadata(stripped, "jpeg") == stripped


def test_jpeg_without_rotation_keeps_no_exif_at_all() -> None:
    stripped = strip_metadata(phone_jpeg(orientation=None), "jpeg")
    assert 0xE1 not in [m for m, _ in jpeg_segments(stripped)]
    assert exif_of(stripped) == {"gps": {}}


def test_jpeg_orientation_still_turns_the_decoded_image() -> None:
    from appliance.imaging import Preprocessing, decode

    stripped = strip_metadata(phone_jpeg(orientation=6), "jpeg")
    decoded = decode(stripped, Preprocessing(), max_pixels=10**8, blur_full_resolution=False)
    assert (decoded.width, decoded.height) == (120, 160)  # rotated: the 160x120 photo stands upright


def test_plain_pil_jpeg_is_left_byte_identical() -> None:
    data = encode(photo(80, 60))
    assert strip_metadata(data, "jpeg") == data


def test_progressive_jpeg_with_restart_markers_keeps_every_scan() -> None:
    # Several scans with tables between them, RSTn markers and stuffed FF 00 bytes inside
    # the entropy-coded data: the scan walk must stop only at real markers.
    data = encode(photo(640, 480, seed=5), "JPEG", progressive=True, restart_marker_rows=1, exif=gps_exif())
    scans = data.count(b"\xff\xda")
    assert scans > 1 and b"\xff\xd0" in data and b"\xff\x00" in data
    stripped = strip_metadata(data, "jpeg")
    assert stripped.count(b"\xff\xda") == scans and exif_of(stripped) == {ORIENTATION: 6, "gps": {}}
    assert jpeg_scan(stripped) == jpeg_scan(data)
    assert np.array_equal(pixels(stripped), pixels(data))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunks(data: bytes) -> list[bytes]:
    out, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append(kind)
        pos += 12 + length
    return out


def phone_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "patient 4711")
    info.add_text("Location", "Leiden clinic", zip=True)
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    data = encode(photo(64, 48, seed=4), "PNG", exif=gps_exif(), pnginfo=info)
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + png_chunk(b"tIME", b"\x07\xea\x0b\x1b\x0c\x00\x00") + data[iend:]


def test_png_loses_text_time_and_gps_but_not_pixels() -> None:
    original = phone_png()
    assert {b"tEXt", b"zTXt", b"iTXt", b"tIME", b"eXIf"} <= set(png_chunks(original))
    stripped = strip_metadata(original, "png")
    assert not {b"tEXt", b"zTXt", b"iTXt", b"tIME"} & set(png_chunks(stripped))
    assert b"Pixel 7" not in stripped and b"patient" not in stripped
    assert exif_of(stripped) == {ORIENTATION: 6, "gps": {}}
    assert np.array_equal(pixels(stripped), pixels(original))
    assert strip_metadata(stripped, "png") == stripped


def webp_chunks(data: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 12
    while pos < len(data):
        kind, length = struct.unpack_from("<4sI", data, pos)
        out[kind] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length + (length & 1)
    return out


@pytest.mark.parametrize("orientation", [6, None])
def test_webp_loses_exif_and_xmp_and_fixes_its_header(orientation: int | None) -> None:
    original = encode(photo(64, 48, seed=5), "WEBP", quality=80, exif=gps_exif(orientation), xmp=XMP)
    assert {b"VP8X", b"EXIF", b"XMP "} <= set(webp_chunks(original))
    stripped = strip_metadata(original, "webp")
    chunks = webp_chunks(stripped)
    assert b"XMP " not in chunks and b"Pixel 7" not in stripped
    assert struct.unpack_from("<I", stripped, 4)[0] == len(stripped) - 8
    flags = chunks[b"VP8X"][0]
    assert not flags & 0x04  # XMP flag cleared
    assert bool(flags & 0x08) == (orientation is not None) == (b"EXIF" in chunks)
    assert exif_of(stripped) == ({ORIENTATION: 6, "gps": {}} if orientation else {"gps": {}})
    assert np.array_equal(pixels(stripped), pixels(original))
    assert strip_metadata(stripped, "webp") == stripped


def test_broken_structure_and_unknown_format_are_refused() -> None:
    data = phone_jpeg()
    with pytest.raises(MetadataError, match="^JPEG: segment at byte 2 runs past the end$"):
        strip_metadata(data[:2] + b"\xff\xe0\xff\xff" + data[6:40], "jpeg")
    with pytest.raises(ValueError, match="^strip_metadata: expected one of jpeg, png, webp; got 'gif'$"):
        strip_metadata(data, "gif")


@pytest.mark.parametrize("backend", ["sqlite", "disk"])
async def test_images_are_stripped_before_they_are_stored(aiohttp_client: Any, make_config: Any, backend: str) -> None:
    client = await aiohttp_client(create_app(make_config(storage__backend=backend)))
    original = encode(photo(seed=6), "JPEG", exif=gps_exif(), xmp=XMP, comment=b"patient 4711")
    status, body = await check(client, original)
    assert status == 200
    store = client.app[STORE]
    stored = store.read_image("user001", body["image_id"])
    assert stored == strip_metadata(original, "jpeg") and b"Pixel 7" not in stored
    [record] = store.list_images("user001")
    assert record["bytes"] == len(stored)
    assert (record["width"], record["height"]) == (450, 600)  # orientation 6 read from the original


async def test_stripping_on_store_can_be_turned_off(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(privacy__strip_metadata_on_store=False)))
    original = encode(photo(seed=6), "JPEG", exif=gps_exif())
    status, body = await check(client, original)
    assert status == 200
    assert client.app[STORE].read_image("user001", body["image_id"]) == original
