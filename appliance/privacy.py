"""Lossless removal of location, device and free-text metadata from JPEG, PNG and WebP bytes.

Nothing is re-encoded: unwanted segments or chunks are cut out and every other
byte (pixel data, colour profiles, JPEG tables and scans) is kept as it was, so
the pixels decode identically. One tag survives: EXIF Orientation, rewritten as
the only entry of a minimal EXIF block, because phones store photos sideways
and rely on it (our decoder, the server and every viewer apply it). GPS,
make, model, serial numbers, timestamps, thumbnails, XMP, IPTC and comments
all go. Running `strip_metadata` on its own output returns the same bytes.

JPEG is an allow-list: APP0 (JFIF), APP2 ICC_PROFILE and APP14 (Adobe colour
transform) stay, every other APPn (EXIF, XMP, extended XMP, MPF, FlashPix,
IPTC/Photoshop, maker blocks) and COM goes, and so do bytes after the primary
image's EOI (where multi-picture phone JPEGs keep secondary images, each with
its own EXIF). PNG drops eXIf (kept as orientation only), tEXt, zTXt, iTXt and
tIME. WebP drops XMP and EXIF (kept as orientation only) and fixes the RIFF
size and the VP8X flags.
"""

from __future__ import annotations

import re
import struct
import zlib

from .contract import ACCEPTED_FORMATS

_EXIF_HEADER = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112

# APPn segments kept in a JPEG, by marker and identifier prefix; everything else goes.
_JPEG_KEEP_APP = {
    0xE0: (b"",),  # JFIF / JFXX: density and a thumbnail of the image itself, no metadata
    0xE2: (b"ICC_PROFILE\x00",),  # the colour profile changes how pixels display
    0xEE: (b"Adobe",),  # the colour transform flag changes how pixels decode
}
# Markers without a length field: TEM, RST0-7, SOI (EOI ends the walk).
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8}
# Inside entropy-coded data FF 00 is a stuffed FF byte, FF D0-D7 a restart marker and
# FF FF fill: all part of the scan. Any other FF xx is the next marker (one C-speed pass).
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DROP = {b"tEXt", b"zTXt", b"iTXt", b"tIME"}
# VP8X flag bits (first payload byte).
_VP8X_EXIF = 0x08
_VP8X_XMP = 0x04


class MetadataError(ValueError):
    """The image's container structure is broken, so its metadata cannot be removed safely."""


def strip_metadata(data: bytes, fmt: str) -> bytes:
    """Return `data` without location, device and text metadata, keeping only EXIF orientation."""
    if fmt == "jpeg":
        return _strip_jpeg(bytes(data))
    if fmt == "png":
        return _strip_png(bytes(data))
    if fmt == "webp":
        return _strip_webp(bytes(data))
    raise ValueError(f"strip_metadata: expected one of {', '.join(ACCEPTED_FORMATS)}; got {fmt!r}")


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (1 to 8) of a TIFF-structured EXIF block, 1 when absent or unreadable."""
    if tiff.startswith(_EXIF_HEADER):
        tiff = tiff[len(_EXIF_HEADER) :]
    if tiff[:4] == b"II*\x00":
        order = "<"
    elif tiff[:4] == b"MM\x00*":
        order = ">"
    else:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(count):
            tag, kind, n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * i)
            if tag == _ORIENTATION_TAG and kind == 3 and n == 1:
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * i + 8)
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def _orientation_tiff(orientation: int) -> bytes:
    """A minimal big-endian TIFF block holding only the Orientation tag."""
    entry = struct.pack(">HHIH2x", _ORIENTATION_TAG, 3, 1, orientation)
    return b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)


def _strip_jpeg(data: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        raise MetadataError("not a JPEG: no SOI marker")
    view = memoryview(data)  # kept parts are joined from views: no copy of the scans but the result
    out: list[bytes | memoryview] = [data[:2]]
    pos = 2
    size = len(data)
    while pos < size:
        if data[pos] != 0xFF:
            raise MetadataError(f"JPEG: expected a marker at byte {pos}")
        marker_start = pos
        while pos < size and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= size:
            break
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI: whatever follows is a trailer, not this image
            out.append(b"\xff\xd9")
            return b"".join(out)
        if marker in _JPEG_STANDALONE:
            out.append(data[marker_start:pos])
            continue
        if pos + 2 > size:
            raise MetadataError(f"JPEG: segment at byte {marker_start} is truncated")
        (length,) = struct.unpack_from(">H", data, pos)
        end = pos + length
        if length < 2 or end > size:
            raise MetadataError(f"JPEG: segment at byte {marker_start} runs past the end")
        payload = data[pos + 2 : end]
        if marker == 0xDA:  # SOS: the header, then entropy-coded data up to the next real marker
            end = _jpeg_scan_end(data, end)
            out.append(view[marker_start:end])
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            kept = _jpeg_app_kept(marker, payload)
            if kept is not None:
                out.append(data[marker_start : pos - 1] + bytes([marker]) + kept)
        else:
            out.append(view[marker_start:end])
        pos = end
    # A truncated file without EOI: keep what was there (scan data holds no metadata).
    return b"".join(out)


def _jpeg_scan_end(data: bytes, pos: int) -> int:
    """The offset of the first marker after entropy-coded data starting at `pos` (or the end)."""
    found = _JPEG_NEXT_MARKER.search(data, pos)
    return len(data) if found is None else found.start()


def _jpeg_app_kept(marker: int, payload: bytes) -> bytes | None:
    """The length-prefixed segment body to keep for an APPn or COM segment, or None to drop it."""
    if marker == 0xE1 and payload.startswith(_EXIF_HEADER):
        orientation = exif_orientation(payload)
        if orientation == 1:
            return None
        body = _EXIF_HEADER + _orientation_tiff(orientation)
        return struct.pack(">H", len(body) + 2) + body
    prefixes = _JPEG_KEEP_APP.get(marker)
    if prefixes is not None and any(payload.startswith(p) for p in prefixes):
        return struct.pack(">H", len(payload) + 2) + payload
    return None


def _strip_png(data: bytes) -> bytes:
    if not data.startswith(_PNG_SIGNATURE):
        raise MetadataError("not a PNG: no signature")
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise MetadataError(f"PNG: chunk at byte {pos} is truncated")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise MetadataError(f"PNG: chunk {kind!r} at byte {pos} runs past the end")
        if kind == b"eXIf":
            orientation = exif_orientation(data[pos + 8 : pos + 8 + length])
            if orientation != 1:
                body = _orientation_tiff(orientation)
                crc = zlib.crc32(b"eXIf" + body)
                out.append(struct.pack(">I4s", len(body), b"eXIf") + body + struct.pack(">I", crc))
        elif kind not in _PNG_DROP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":  # anything after IEND is not part of the image
            break
    return b"".join(out)


def _strip_webp(data: bytes) -> bytes:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise MetadataError("not a WebP: no RIFF/WEBP header")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    limit = min(len(data), 8 + riff_size)  # bytes past the RIFF size are not part of the file
    chunks: list[bytearray | bytes] = []
    vp8x_index = None
    has_exif = False
    pos = 12
    while pos < limit:
        if pos + 8 > limit:
            raise MetadataError(f"WebP: chunk at byte {pos} is truncated")
        fourcc, length = struct.unpack_from("<4sI", data, pos)
        end = pos + 8 + length + (length & 1)  # chunks are padded to an even size
        if pos + 8 + length > limit:
            raise MetadataError(f"WebP: chunk {fourcc!r} at byte {pos} runs past the end")
        end = min(end, limit)
        if fourcc == b"EXIF":
            orientation = exif_orientation(data[pos + 8 : pos + 8 + length])
            if orientation != 1:
                body = _orientation_tiff(orientation)
                chunks.append(struct.pack("<4sI", b"EXIF", len(body)) + body)  # 26 bytes: even, no pad
                has_exif = True
        elif fourcc != b"XMP ":
            if fourcc == b"VP8X":
                vp8x_index = len(chunks)
                chunks.append(bytearray(data[pos:end]))
            else:
                chunks.append(data[pos:end])
        pos = end
    if vp8x_index is not None:
        vp8x = chunks[vp8x_index]
        assert isinstance(vp8x, bytearray)
        flags = vp8x[8] & ~(_VP8X_EXIF | _VP8X_XMP)
        vp8x[8] = flags | (_VP8X_EXIF if has_exif else 0)
    body = b"WEBP" + b"".join(bytes(c) for c in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body
