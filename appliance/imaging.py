"""Image bytes to model input: sniff the type, decode small, orient, blur score, preprocess.

The reference is what the model was trained and checked with: PIL decode,
`convert("RGB")`, torchvision `Resize(256)` (PIL bilinear, antialiased),
`CenterCrop(224)`, `ToTensor`, `Normalize`. Images that are not reduced give
that tensor to within float32 rounding (tests compare with real torchvision).

Fast path (mode "fast"). A JPEG whose shorter side is at least twice the needed size is
decoded with libjpeg's DCT-domain scaling (`Image.draft`, 1/2, 1/4 or 1/8) to
the smallest scale whose shorter side stays >= max(2 * resize_shorter,
BLUR_SHORT_SIDE), so the antialiased resize still has >= 2 source pixels per
output pixel. Measured on 2 shared cores, synthetic 4032x3024 photo, JPEG
q=90 (3.3 MB): decode alone 53 ms full size, 36 ms with PIL draft 1/4 and
36 ms with OpenCV IMREAD_REDUCED_COLOR_4 (the same libjpeg-turbo scaling, the
same pixels; not faster, and it would need its own EXIF and CMYK handling),
so PIL draft it is. Whole `decode`: 41 ms default, 220 ms with
`blur_full_resolution` (full decode, resize from 12 MP, full-size Laplacian);
600x450: 5 ms. Versus the full-decode reference a 1/4-scale tensor differs by
max |d| 0.035-0.07 and mean |d| ~0.004 in normalised units (one 8-bit step is
0.0175); 1/2 and 1/8 scale up to max 0.14, mean 0.007. The tests bound max at
0.2 and mean at 0.01. On a model sensitive to small input changes that moves
probabilities by up to 0.57 and flips answers, so the fast path is served only
where `convert` measured it against PyTorch for that model (a served path);
mode "exact" decodes whole and gives the reference tensor.

Blur score: variance of the 4-neighbour Laplacian of the greyscale image (the
old server's definition). The old server took it at full resolution; by
default we take it at a defined resolution, shorter side BLUR_SHORT_SIDE (512)
or the original when smaller, downscaled with area averaging from the reduced
decode. Scores are then independent of the phone's sensor size, and images up
to 512 px on their shorter side score exactly as before. Larger photos score
as they look at that size: slight defocus of a 12 MP photo (sigma 1-2 px at
full size) scores well above the old server's score (ratios in
bench/blur_scale.py), heavy blur still falls below BLUR_THRESHOLD.
`blur_full_resolution` restores the old definition exactly (full decode, full
resolution), except that 16-bit greyscale is mapped as in `_to_rgb`.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import cv2
import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from appliance.contract import IMAGE_FORMATS
from appliance.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

# The model's preprocessing and the decode modes a served path names are model-directory facts;
# imported here so `imaging.Preprocessing` and `imaging.DECODE_MODES` read where decoding happens.
from appliance.modeldir import DECODE_MODES as DECODE_MODES, DecodeMode, Preprocessing

# Beyond this aspect ratio the resize works on the crop's box only (memory; see _preprocess).
MAX_RESIZED_ASPECT = 8

# Shorter side, in pixels, of the greyscale image the default blur score is computed on.
BLUR_SHORT_SIDE = 512

_INVALID = "Invalid image file"

# The plugin classes are used directly, not `Image.open`: the type is already
# known from the bytes, and `Image.open` applies PIL's process-global
# MAX_IMAGE_PIXELS guard (a warning at 89 MP, an error at 179 MP) that would
# override the configured cap, which is checked from the header instead.
# JpegImageFile (not Image.open's MPO upgrade) also decodes the primary image
# of a multi-picture phone JPEG and ignores its depth or gain maps.
_PIL_CLASS: dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]] = {
    "jpeg": JpegImagePlugin.JpegImageFile,
    "png": PngImagePlugin.PngImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
}

# EXIF orientation -> the transposition that undoes it (as ImageOps.exif_transpose).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"mif1", b"msf1"}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
# Start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, EXIF-oriented RGB image, possibly reduced, with its blur score."""

    format: str  # a key of contract.IMAGE_FORMATS
    width: int  # of the full image, after EXIF orientation
    height: int
    blur_score: float
    tensor: np.ndarray  # float32 [3, crop, crop], normalised, ready for the model
    reduction: int = 1  # the JPEG DCT scale the image was decoded at (1, 2, 4 or 8)


def sniff(data: bytes) -> str:
    """Name the image type from its bytes; raise 415 for other image kinds, 400 for non-images."""
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    kind = _other_image_kind(data)
    if kind is not None:
        accepted = ", ".join(fmt.label for fmt in IMAGE_FORMATS.values())
        raise UnsupportedMediaType(f"Unsupported image type: {kind}. Accepted types: {accepted}")
    raise BadRequest(_INVALID)


def _other_image_kind(data: bytes) -> str | None:
    """Name an image kind we do not accept, or None when the bytes are no image we know."""
    head = bytes(data[:64])
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        return _ftyp_kind(data)
    if head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n") or head.startswith(b"\xff\x0a"):
        return "JPEG XL"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    if b"%PDF-" in bytes(data[:1024]):  # readers accept the header anywhere in the first 1 KiB
        return "PDF"
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return "EPS"
    if head[:4] == b"8BPS":
        return "PSD"
    if head[:4] == b"qoif":
        return "QOI"
    if head[:4] == b"icns":
        return "ICNS"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) >= 22:
        count = struct.unpack_from("<H", head, 4)[0]
        if 0 < count <= 256 and head[9] == 0:  # the first directory entry's reserved byte
            return "ICO" if head[2] == 1 else "CUR"
    if _is_svg(data):
        return "SVG"
    return None


def _ftyp_kind(data: bytes) -> str | None:
    """HEIC, HEIF or AVIF from an ISO-BMFF `ftyp` box; None for video and other boxes."""
    size = struct.unpack_from(">I", data, 0)[0]
    major = bytes(data[8:12])
    compatible = {bytes(data[i : i + 4]) for i in range(16, min(size, len(data), 256) - 3, 4)}
    for brands in ({major}, compatible):
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIC_BRANDS:
            return "HEIC"
    if ({major} | compatible) & _HEIF_BRANDS:
        return "HEIF"
    if major == b"crx ":
        return "CR3"
    return None


def _is_svg(data: bytes) -> bool:
    """An SVG document: `<svg` first, or an XML prologue with an `<svg` element."""
    text = bytes(data[:4096]).lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<svg"):
        return True
    return text.startswith((b"<?xml", b"<!doctype", b"<!--")) and b"<svg" in text


def decode(
    data: bytes,
    spec: Preprocessing,
    *,
    max_pixels: int,
    mode: DecodeMode = "fast",
    blur_full_resolution: bool = False,
    blur_short_side: int = BLUR_SHORT_SIDE,
) -> DecodedImage:
    """Decode, orient, score blur and preprocess.

    `mode` "fast" decodes large JPEGs DCT-scaled (see the module docstring);
    "exact" decodes every image whole, so the tensor is the reference's.
    `blur_short_side` is the shorter side the default blur score is taken at;
    `blur_full_resolution` takes it on a full decode instead (the old server).
    """
    fmt = sniff(data)
    width, height = _header_size(fmt, data)
    _check_pixels(width, height, max_pixels)
    try:
        im = _PIL_CLASS[fmt](io.BytesIO(data))
        width, height = im.size  # the same header, as PIL's decoder will use it
        _check_pixels(width, height, max_pixels)
        orientation = _orientation(im)
        reduction = 1
        box = (0.0, 0.0, float(im.width), float(im.height))
        if fmt == "jpeg" and mode == "fast" and not blur_full_resolution:
            reduction = _jpeg_reduction(im.size, max(2 * spec.resize_shorter, blur_short_side))
            if reduction > 1:
                # Requesting (w // s, h // s) makes PIL pick exactly scale s; the
                # returned box is the full image's extent in reduced pixels (the
                # last row and column may be partial).
                drafted = im.draft("RGB", (width // reduction, height // reduction))
                if drafted is None:  # PIL could not scale this file; decode it whole
                    reduction = 1
                else:
                    box = drafted[1]
        im.load()
        rgb = _to_rgb(im)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise BadRequest(_INVALID) from e
    except Image.DecompressionBombError as e:  # not expected (PIL's guard is bypassed); never a 500
        raise PayloadTooLarge(f"Image too large: {width}x{height} pixels exceeds the limit of {max_pixels}") from e

    method = _ORIENT.get(orientation)
    if method is not None:
        box = _transpose_box(box, rgb.size, method)
        rgb = rgb.transpose(method)
        if orientation >= 5:  # 5 to 8 swap the axes
            width, height = height, width

    pixels = np.asarray(rgb)
    blur = _blur_score(pixels, None if blur_full_resolution else blur_short_side)
    tensor = _preprocess(rgb, box, (width, height), spec)
    return DecodedImage(fmt, width, height, blur, tensor, reduction)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise PayloadTooLarge(f"Image too large: {width}x{height} pixels exceeds the limit of {max_pixels}")


def _header_size(fmt: str, data: bytes) -> tuple[int, int]:
    """Width and height from the header, and a check that the file is complete.

    Completeness is checked here because PIL pads a truncated image with grey
    when the process-global ImageFile.LOAD_TRUNCATED_IMAGES is set; a partial
    upload must be a 400 whatever another library set.
    """
    try:
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "png":
            return _png_size(data)
        return _webp_size(data)
    except (struct.error, IndexError) as e:
        raise BadRequest(_INVALID) from e


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, size = 2, None
    while True:
        if data[i] != 0xFF:
            raise BadRequest(_INVALID)
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == 0xD9:  # EOI before any scan
            raise BadRequest(_INVALID)
        length = struct.unpack_from(">H", data, i + 2)[0]
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, i + 5)
            size = (width, height)
        if marker == 0xDA:
            break
        i += 2 + length
    # Entropy-coded data never contains FF D9 (an FF there is followed by 00 or
    # a restart marker), so no EOI after the first scan means truncation. Only
    # an EOI after the scan counts (an EXIF thumbnail has its own); rfind finds
    # the usual one at the very end at once.
    if size is None or 0 in size or data.rfind(b"\xff\xd9") < i:
        raise BadRequest(_INVALID)
    return size


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR" or data.rfind(b"\x00\x00\x00\x00IEND\xaeB`\x82") < 0:
        raise BadRequest(_INVALID)
    width, height = struct.unpack_from(">II", data, 16)
    if width == 0 or height == 0:
        raise BadRequest(_INVALID)
    return width, height


def _webp_size(data: bytes) -> tuple[int, int]:
    # The size is read here, not by PIL: libwebp's animation decoder allocates
    # the whole canvas when it is created, before any cap could be checked.
    riff_size = struct.unpack_from("<I", data, 4)[0]
    if len(data) < 8 + riff_size:
        raise BadRequest(_INVALID)
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            raise BadRequest(_INVALID)
        bits = struct.unpack_from("<I", data, 21)[0]
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise BadRequest(_INVALID)
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    else:
        raise BadRequest(_INVALID)
    if width == 0 or height == 0:
        raise BadRequest(_INVALID)
    return width, height


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 to 8), 1 when absent or out of range."""
    value = im.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _jpeg_reduction(size: tuple[int, int], min_short: int) -> int:
    """The largest DCT scale (8, 4, 2) that keeps the shorter side >= min_short, else 1."""
    short = min(size)
    for scale in (8, 4, 2):
        if short >= min_short * scale:
            return scale
    return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB exactly as `convert("RGB")` gives it, but for 16-bit greyscale.

    PIL's I;16 -> RGB conversion clips every value above 255 to white; 16-bit
    greyscale is mapped to 8 bits by its high byte (v >> 8) instead, which is
    what PIL already does for 16-bit RGB(A) and grey+alpha PNGs.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # "I" only comes from 16-bit sources here; clip before the shift all the same.
        grey = (np.clip(np.asarray(im), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode == "P" and "transparency" in im.info:
        # Same RGB values as convert("RGB"), without PIL's warning about
        # transparency given as bytes (warnings are errors in the tests).
        im = im.convert("RGBA")
    return im.convert("RGB")


def _transpose_box(box: tuple[float, float, float, float], size: tuple[int, int], method: Image.Transpose) -> tuple:
    """Where a region of an image of `size` lands after `method`."""
    x0, y0, x1, y1 = box
    w, h = size
    T = Image.Transpose
    return {
        T.FLIP_LEFT_RIGHT: (w - x1, y0, w - x0, y1),
        T.FLIP_TOP_BOTTOM: (x0, h - y1, x1, h - y0),
        T.ROTATE_180: (w - x1, h - y1, w - x0, h - y0),
        T.TRANSPOSE: (y0, x0, y1, x1),
        T.TRANSVERSE: (h - y1, w - x1, h - y0, w - x0),
        T.ROTATE_90: (y0, w - x1, y1, w - x0),  # counter-clockwise: (x, y) -> (y, w - x)
        T.ROTATE_270: (h - y1, x0, h - y0, x1),  # clockwise: (x, y) -> (h - y, x)
    }[method]


def _blur_score(rgb: np.ndarray, short_side: int | None) -> float:
    """Variance of the 4-neighbour Laplacian of the greyscale image, downscaled to `short_side` if given."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    if short_side is not None and min(w, h) > short_side:
        f = short_side / min(w, h)
        grey = cv2.resize(grey, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    # ksize=1 is the 4-neighbour kernel [[0,1,0],[1,-4,1],[0,1,0]].
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _preprocess(rgb: Image.Image, box: tuple, full_size: tuple[int, int], spec: Preprocessing) -> np.ndarray:
    """torchvision Resize(resize_shorter) + CenterCrop(crop) + ToTensor + Normalize."""
    w, h = full_size
    # The output size comes from the full image, as torchvision computes it,
    # even when `rgb` is a reduced decode; `box` maps the reduced pixels back.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.resize_shorter, int(spec.resize_shorter * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    top = int(round((new_h - spec.crop) / 2.0))
    left = int(round((new_w - spec.crop) / 2.0))
    if new_long <= MAX_RESIZED_ASPECT * new_short:
        resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR, box=box)
        crop = np.asarray(resized)[top : top + spec.crop, left : left + spec.crop]
    else:
        # A strip such as 30000x2 would become a 256x3840000 intermediate
        # (gigabytes): resample only the centre crop's source box instead.
        # The same filter up to one 8-bit rounding step (PIL's coefficients
        # for an offset box round differently), which only such non-photos see.
        x0, y0, x1, y1 = box
        sx, sy = (x1 - x0) / new_w, (y1 - y0) / new_h
        crop_box = (x0 + left * sx, y0 + top * sy, x0 + (left + spec.crop) * sx, y0 + (top + spec.crop) * sy)
        crop = np.asarray(rgb.resize((spec.crop, spec.crop), Image.Resampling.BILINEAR, box=crop_box))
    return normalize(crop, spec)


def normalize(crop: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """An 8-bit RGB crop [H, W, 3] as the model's input [3, H, W]: ToTensor and Normalize, float32 throughout,
    operation for operation."""
    scaled = crop.astype(np.float32) / np.float32(255)
    normalised = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)
