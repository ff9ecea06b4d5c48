"""appliance.imaging: type sniffing, decode errors, the pixel cap, modes, EXIF, the reference tensor, blur."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image, ImageFile, ImageOps

from appliance import imaging
from appliance.errors import BadRequest, ModelError, PayloadTooLarge, UnsupportedMediaType
from appliance.imaging import DecodedImage, Preprocessing, decode, sniff

SPEC = Preprocessing()
MAX_PIXELS = 40_000_000

# A reduced (DCT-scaled) decode versus the full-decode reference, in normalised
# units (one 8-bit step is 1 / 255 / std ~ 0.0175). Measured on these
# photo-like images: 1/4 scale (12 MP) max 0.05-0.07, mean 0.004; 1/2 and 1/8
# scale max up to 0.14, mean up to 0.007.
REDUCED_MAX_ABS = 0.2
REDUCED_MEAN_ABS = 0.01


# ---------------------------------------------------------------- factories


def make_photo(width: int, height: int, *, seed: int = 0, sigma: float = 0.0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth shading, mid-scale texture, thin dark lines, sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(height // 64 + 2, width // 64 + 2, 3)).astype(np.float32)
    mid = rng.normal(size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) * 30 + 150
    img += cv2.resize(mid, (width, height), interpolation=cv2.INTER_LINEAR) * 12
    thickness = max(1, width // 1500)
    for _ in range(10):
        p0 = (int(rng.integers(0, width)), 0)
        p1 = (int(rng.integers(0, width)), height - 1)
        cv2.line(img, p0, p1, (40.0, 30.0, 30.0), thickness)
    cv2.circle(img, (width // 2, height // 2), min(width, height) // 5, (90.0, 60.0, 50.0), -1)
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0, 2, size=(height, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(im: Image.Image | np.ndarray, fmt: str, **params) -> bytes:
    """Real encoded bytes, made by PIL."""
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def png_bytes(width: int, height: int, *, bit_depth: int, color_type: int, raw_rows: bytes | None = None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor claim a size it does not hold)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw_rows if raw_rows is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def with_orientation(im: Image.Image, fmt: str, orientation: int, **params) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif, **params)


def reference(rgb: Image.Image, spec: Preprocessing = SPEC) -> np.ndarray:
    """The training-time pipeline, with real torchvision."""
    pipeline = T.Compose(
        [
            T.Resize(spec.resize_shorter),
            T.CenterCrop(spec.crop),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    return pipeline(rgb).numpy()


def reference_of(data: bytes, spec: Preprocessing = SPEC) -> np.ndarray:
    return reference(Image.open(io.BytesIO(data)).convert("RGB"), spec)


def old_blur_score(data: bytes) -> float:
    """The old server: full decode, RGB, greyscale, variance of the Laplacian."""
    grey = cv2.cvtColor(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def assert_error(excinfo: pytest.ExceptionInfo, cls: type, status: int, detail: str) -> None:
    assert type(excinfo.value) is cls
    assert excinfo.value.status == status
    assert excinfo.value.detail == detail


@pytest.fixture(scope="module")
def photo_600() -> bytes:
    return encode(make_photo(600, 450, seed=1), "JPEG", quality=90)


@pytest.fixture(scope="module")
def photo_12mp() -> bytes:
    return encode(make_photo(4032, 3024, seed=2), "JPEG", quality=90)


# ---------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("fmt", "params", "name"),
    [("JPEG", {}, "jpeg"), ("PNG", {}, "png"), ("WEBP", {}, "webp"), ("WEBP", {"lossless": True}, "webp")],
)
def test_sniff_names_accepted_types(fmt: str, params: dict, name: str) -> None:
    assert sniff(encode(make_photo(64, 48), fmt, **params)) == name


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00\x00\x00\x08mdat"


def _small() -> Image.Image:
    return Image.fromarray(make_photo(32, 24))


REJECTED = {
    "GIF": lambda: encode(_small().convert("P"), "GIF"),
    "BMP": lambda: encode(_small(), "BMP"),
    "TIFF": lambda: encode(_small(), "TIFF"),
    "ICO": lambda: encode(_small(), "ICO"),
    "PDF": lambda: encode(_small(), "PDF"),
    "HEIC": lambda: _ftyp(b"heic", b"mif1", b"heic"),
    "HEIF": lambda: _ftyp(b"mif1", b"mif1", b"miaf"),
    "AVIF": lambda: _ftyp(b"avif", b"mif1", b"avif", b"miaf"),
    "SVG": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "PSD": lambda: b"8BPS\x00\x01" + b"\x00" * 40,
    "JPEG XL": lambda: b"\xff\x0a\xfa\x7f\x01\x90\x08",
    "JPEG 2000": lambda: b"\x00\x00\x00\x0cjP  \r\n\x87\n" + _ftyp(b"jp2 ", b"jp2 "),
}


@pytest.mark.parametrize("kind", sorted(REJECTED))
def test_other_image_kinds_are_415(kind: str) -> None:
    data = REJECTED[kind]()
    detail = f"Unsupported image type: {kind}. Accepted types: JPEG, PNG, WebP"
    with pytest.raises(UnsupportedMediaType) as excinfo:
        sniff(data)
    assert_error(excinfo, UnsupportedMediaType, 415, detail)
    with pytest.raises(UnsupportedMediaType) as excinfo:
        decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert_error(excinfo, UnsupportedMediaType, 415, detail)


def test_svg_with_xml_prologue_is_415() -> None:
    data = b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- drawn by hand -->\n<svg xmlns="http://www.w3.org/2000/svg"/>'
    with pytest.raises(UnsupportedMediaType) as excinfo:
        sniff(data)
    assert excinfo.value.detail == "Unsupported image type: SVG. Accepted types: JPEG, PNG, WebP"


NOT_IMAGES = {
    "empty": b"",
    "text": b"hello, this is not a photo",
    "html": b"<html><body>no</body></html>",
    "xml without svg": b'<?xml version="1.0"?><note>hi</note>',
    "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "mp4": _ftyp(b"isom", b"isom", b"mp41"),
    "wav": b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 28,
    "zip": b"PK\x03\x04" + b"\x00" * 60,
    "bm text": b"BMW owners' manual",
}


@pytest.mark.parametrize("name", sorted(NOT_IMAGES))
def test_non_images_are_400(name: str) -> None:
    with pytest.raises(BadRequest) as excinfo:
        sniff(NOT_IMAGES[name])
    assert_error(excinfo, BadRequest, 400, "Invalid image file")
    with pytest.raises(BadRequest) as excinfo:
        decode(NOT_IMAGES[name], SPEC, max_pixels=MAX_PIXELS)
    assert_error(excinfo, BadRequest, 400, "Invalid image file")


# ---------------------------------------------------------------- broken files


def _broken() -> dict[str, bytes]:
    jpeg = encode(make_photo(320, 240), "JPEG", quality=90)
    png = encode(make_photo(320, 240), "PNG")
    webp = encode(make_photo(320, 240), "WEBP")
    progressive = encode(make_photo(320, 240), "JPEG", quality=90, progressive=True)
    return {
        "jpeg truncated": jpeg[: len(jpeg) * 2 // 3],
        "jpeg without EOI": jpeg[:-2],
        "jpeg progressive truncated": progressive[: len(progressive) // 2],
        "jpeg magic only": b"\xff\xd8\xff\xe0" + b"\x00" * 50,
        "jpeg garbage scan": jpeg[:600] + b"\x13" * 2000 + b"\xff\xd9",
        "png truncated": png[: len(png) // 2],
        "png signature only": png[:8],
        "png bad IDAT": png_bytes(4, 4, bit_depth=8, color_type=2, raw_rows=b"\x07" * 3),
        "webp truncated": webp[: len(webp) // 2],
        "webp bad chunk": b"RIFF\x0c\x00\x00\x00WEBPJUNK\x00\x00\x00\x00",
    }


BROKEN = _broken()


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_images_are_400(name: str) -> None:
    with pytest.raises(BadRequest) as excinfo:
        decode(BROKEN[name], SPEC, max_pixels=MAX_PIXELS)
    assert_error(excinfo, BadRequest, 400, "Invalid image file")


@pytest.mark.parametrize("name", sorted(n for n in BROKEN if "truncated" in n or "without" in n))
def test_truncated_images_are_400_whatever_pil_is_told(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another library setting PIL's global LOAD_TRUNCATED_IMAGES must not turn
    # a partial upload into a grey-padded image. (A complete file whose
    # compressed data is short, like "png bad IDAT", is then PIL's to judge.)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadRequest) as excinfo:
        decode(BROKEN[name], SPEC, max_pixels=MAX_PIXELS)
    assert_error(excinfo, BadRequest, 400, "Invalid image file")


# ---------------------------------------------------------------- pixel cap


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(make_photo(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_claiming(width: int, height: int) -> bytes:
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + canvas
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


BOMBS = {
    "png": lambda: png_bytes(30000, 30000, bit_depth=8, color_type=2),
    "jpeg": lambda: _jpeg_claiming(30000, 30000),
    "webp": lambda: _webp_claiming(16384, 16384),
}


@pytest.mark.parametrize("fmt", sorted(BOMBS))
def test_pixel_cap_from_header_is_413(fmt: str) -> None:
    data = BOMBS[fmt]()
    assert len(data) < 2000
    side = 16384 if fmt == "webp" else 30000
    with pytest.raises(PayloadTooLarge) as excinfo:
        decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert_error(
        excinfo, PayloadTooLarge, 413, f"Image too large: {side}x{side} pixels exceeds the limit of {MAX_PIXELS}"
    )


def test_pixel_cap_is_inclusive(photo_600: bytes) -> None:
    assert decode(photo_600, SPEC, max_pixels=600 * 450).width == 600
    with pytest.raises(PayloadTooLarge) as excinfo:
        decode(photo_600, SPEC, max_pixels=600 * 450 - 1)
    assert excinfo.value.detail == f"Image too large: 600x450 pixels exceeds the limit of {600 * 450 - 1}"


def test_pil_bomb_guard_does_not_apply(photo_600: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # The configured cap rules, not PIL's global one (a warning, an error at twice it).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode(photo_600, SPEC, max_pixels=MAX_PIXELS).height == 450


# ---------------------------------------------------------------- modes and the reference tensor


def _modes() -> dict[str, tuple[bytes, Image.Image]]:
    """Encoded bytes and the RGB image the reference pipeline should see."""
    rgb = Image.fromarray(make_photo(300, 220, seed=3))
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    palette = rgb.quantize(64)
    out: dict[str, tuple[bytes, Image.Image]] = {}

    def plain(name: str, im: Image.Image, fmt: str, **params) -> None:
        data = encode(im, fmt, **params)
        out[name] = (data, Image.open(io.BytesIO(data)).convert("RGB"))

    plain("jpeg RGB", rgb, "JPEG", quality=90)
    plain("jpeg L", rgb.convert("L"), "JPEG")
    plain("jpeg CMYK", rgb.convert("CMYK"), "JPEG")
    plain("jpeg progressive", rgb, "JPEG", progressive=True)
    plain("jpeg 4:4:4", rgb, "JPEG", subsampling=0)
    plain("png RGB", rgb, "PNG")
    plain("png RGBA", rgba, "PNG")
    plain("png L", rgb.convert("L"), "PNG")
    plain("png LA", rgba.convert("LA"), "PNG")
    plain("png 1", rgb.convert("1"), "PNG")
    plain("png P", palette, "PNG")
    plain("png P transparency int", palette, "PNG", transparency=5)
    plain("webp RGB", rgb, "WEBP", quality=90)
    plain("webp RGBA lossless", rgba, "WEBP", lossless=True)

    # Palette with per-entry alpha: the reference's convert("RGB") warns, so
    # it is computed with that warning silenced.
    data = encode(palette, "PNG", transparency=bytes(range(0, 256, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["png P transparency bytes"] = (data, Image.open(io.BytesIO(data)).convert("RGB"))

    # 16-bit RGB and RGBA (written by hand): PIL keeps the high byte, as convert does.
    wide = np.asarray(rgb).astype(np.uint16) * 257 + 100
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in wide)
    data = png_bytes(300, 220, bit_depth=16, color_type=2, raw_rows=rows)
    out["png RGB 16-bit"] = (data, Image.open(io.BytesIO(data)).convert("RGB"))

    # 16-bit greyscale: the high byte, not convert("RGB")'s clipping at 255.
    grey16 = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257) ^ 0x5A  # low byte differs
    data = encode(Image.fromarray(grey16), "PNG")  # uint16 -> mode I;16
    out["png I;16"] = (data, Image.fromarray((grey16 >> 8).astype(np.uint8)).convert("RGB"))
    return out


MODES = _modes()


@pytest.mark.parametrize("name", sorted(MODES))
def test_modes_match_reference(name: str) -> None:
    data, expected_rgb = MODES[name]
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert isinstance(decoded, DecodedImage)
    assert decoded.format == name.split()[0]
    assert (decoded.width, decoded.height) == (300, 220)
    assert decoded.reduction == 1
    assert decoded.tensor.dtype == np.float32
    assert decoded.tensor.shape == (3, 224, 224)
    assert decoded.tensor.flags.c_contiguous
    np.testing.assert_allclose(decoded.tensor, reference(expected_rgb), rtol=0, atol=1e-5)


def test_16_bit_greyscale_is_not_clipped() -> None:
    data, _ = MODES["png I;16"]
    clipped = Image.open(io.BytesIO(data)).convert("RGB")  # PIL: everything above 255 is white
    assert np.asarray(clipped).min() == 255
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert decoded.tensor.min() < -1.5  # dark pixels stay dark


@pytest.mark.parametrize("size", [(600, 450), (450, 600), (200, 150), (256, 400), (1000, 1000), (1023, 767)])
def test_unreduced_jpeg_matches_torchvision(size: tuple[int, int]) -> None:
    data = encode(make_photo(*size, seed=4), "JPEG", quality=92)
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert decoded.reduction == 1
    np.testing.assert_allclose(decoded.tensor, reference_of(data), rtol=0, atol=1e-5)


def test_large_png_is_decoded_whole_and_matches_torchvision() -> None:
    data = encode(make_photo(2100, 1500, seed=5), "PNG", compress_level=1)
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert decoded.reduction == 1
    np.testing.assert_allclose(decoded.tensor, reference_of(data), rtol=0, atol=1e-5)


def test_other_preprocessing_matches_torchvision(photo_600: bytes) -> None:
    spec = Preprocessing.from_manifest(
        {"resize_shorter": 160, "crop": 128, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0], "color": "RGB"}
    )
    decoded = decode(photo_600, spec, max_pixels=MAX_PIXELS)
    assert decoded.tensor.shape == (3, 128, 128)
    np.testing.assert_allclose(decoded.tensor, reference_of(photo_600, spec), rtol=0, atol=1e-5)


def test_full_resolution_flag_matches_torchvision(photo_12mp: bytes) -> None:
    decoded = decode(photo_12mp, SPEC, max_pixels=MAX_PIXELS, blur_full_resolution=True)
    assert decoded.reduction == 1
    np.testing.assert_allclose(decoded.tensor, reference_of(photo_12mp), rtol=0, atol=1e-5)


@pytest.mark.parametrize("orientation", [1, 6])
def test_exact_mode_decodes_whole_and_matches_torchvision(photo_12mp: bytes, orientation: int) -> None:
    data = photo_12mp
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        with Image.open(io.BytesIO(photo_12mp)) as image:
            out = io.BytesIO()
            image.save(out, "JPEG", quality=90, exif=exif.tobytes())
        data = out.getvalue()
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS, mode="exact")
    assert decoded.reduction == 1
    with Image.open(io.BytesIO(data)) as image:
        expected = reference(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_allclose(decoded.tensor, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the reduced fast path


def test_12mp_jpeg_is_reduced_and_close_to_reference(photo_12mp: bytes) -> None:
    decoded = decode(photo_12mp, SPEC, max_pixels=MAX_PIXELS)
    assert decoded.reduction == 4  # 3024 / 4 = 756 >= 2 * 256
    assert (decoded.width, decoded.height) == (4032, 3024)
    diff = np.abs(decoded.tensor - reference_of(photo_12mp))
    assert diff.max() <= REDUCED_MAX_ABS
    assert diff.mean() <= REDUCED_MEAN_ABS


@pytest.mark.parametrize(
    ("size", "reduction"), [((1100, 1030), 2), ((1023, 1030), 1), ((4100, 4100), 8), ((3000, 4000), 4)]
)
def test_reduction_keeps_shorter_side_at_least_twice_resize(size: tuple[int, int], reduction: int) -> None:
    data = encode(make_photo(*size, seed=6), "JPEG", quality=85)
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert decoded.reduction == reduction
    assert min(size) / reduction >= 2 * SPEC.resize_shorter
    diff = np.abs(decoded.tensor - reference_of(data))
    assert diff.max() <= REDUCED_MAX_ABS
    assert diff.mean() <= REDUCED_MEAN_ABS


# ---------------------------------------------------------------- EXIF orientation


@pytest.fixture(scope="module")
def asymmetric() -> Image.Image:
    """A landscape image no flip or rotation maps onto itself."""
    im = make_photo(320, 240, seed=7)
    im[10:60, 10:100] = (250, 20, 20)
    return Image.fromarray(im)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(asymmetric: Image.Image, fmt: str, orientation: int) -> None:
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = with_orientation(asymmetric, fmt, orientation, **params)
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
    expected = (240, 320) if orientation >= 5 else (320, 240)
    assert (decoded.width, decoded.height) == expected
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert upright.size == expected
    np.testing.assert_allclose(decoded.tensor, reference(upright), rtol=0, atol=1e-5)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_reduced_path(orientation: int) -> None:
    im = Image.fromarray(make_photo(1203, 1031, seed=8))  # odd sizes: the reduced image has partial pixels
    data = with_orientation(im, "JPEG", orientation, quality=90)
    decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
    assert decoded.reduction == 2
    assert (decoded.width, decoded.height) == ((1031, 1203) if orientation >= 5 else (1203, 1031))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    diff = np.abs(decoded.tensor - reference(upright))
    assert diff.max() <= REDUCED_MAX_ABS
    assert diff.mean() <= REDUCED_MEAN_ABS


@pytest.mark.parametrize("method", list(Image.Transpose))
def test_transpose_box_follows_the_pixels(method: Image.Transpose) -> None:
    # A marked region of a 7x5 image lands where the helper says after PIL's transposition.
    mask = Image.new("L", (7, 5))
    mask.paste(255, (0, 0, 4, 3))
    assert mask.transpose(method).getbbox() == imaging._transpose_box((0, 0, 4, 3), (7, 5), method)


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_out_of_range_orientation_is_ignored(asymmetric: Image.Image, value: int) -> None:
    decoded = decode(with_orientation(asymmetric, "PNG", value), SPEC, max_pixels=MAX_PIXELS)
    assert (decoded.width, decoded.height) == (320, 240)
    np.testing.assert_allclose(decoded.tensor, reference(asymmetric), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- blur score


def test_blur_full_resolution_is_the_old_definition(photo_12mp: bytes) -> None:
    decoded = decode(photo_12mp, SPEC, max_pixels=MAX_PIXELS, blur_full_resolution=True)
    assert decoded.blur_score == old_blur_score(photo_12mp)


@pytest.mark.parametrize("name", ["jpeg RGB", "png RGBA", "webp RGB", "png P transparency bytes"])
def test_blur_full_resolution_is_the_old_definition_for_each_type(name: str) -> None:
    data, expected_rgb = MODES[name]
    grey = cv2.cvtColor(np.asarray(expected_rgb), cv2.COLOR_RGB2GRAY)
    expected = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    assert decode(data, SPEC, max_pixels=MAX_PIXELS, blur_full_resolution=True).blur_score == expected


def test_small_images_score_as_before_on_default_path(photo_600: bytes) -> None:
    # Shorter side <= BLUR_SHORT_SIDE: the default score is the old one exactly.
    assert decode(photo_600, SPEC, max_pixels=MAX_PIXELS).blur_score == old_blur_score(photo_600)


@pytest.mark.parametrize("size", [(1600, 1200), (4032, 3024)])
def test_sharper_scores_higher_on_default_path(size: tuple[int, int]) -> None:
    scores = []
    for sigma in (0.0, 2.0, 4.0, 8.0):
        data = encode(make_photo(*size, seed=9, sigma=sigma), "JPEG", quality=90)
        decoded = decode(data, SPEC, max_pixels=MAX_PIXELS)
        assert decoded.reduction > 1
        scores.append(decoded.blur_score)
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > 2 * scores[-1]


def test_blur_short_side_is_configurable(photo_12mp: bytes) -> None:
    wide = decode(photo_12mp, SPEC, max_pixels=MAX_PIXELS, blur_short_side=1024)
    assert wide.reduction == 2
    assert wide.blur_score != decode(photo_12mp, SPEC, max_pixels=MAX_PIXELS).blur_score


# ---------------------------------------------------------------- the manifest's preprocessing table


def test_from_manifest_reads_the_readme_table() -> None:
    table = {
        "color": "RGB",
        "resize_shorter": 256,
        "interpolation": "bilinear-antialias",
        "crop": 224,
        "scale": 0.00392156862745098,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert Preprocessing.from_manifest(table) == Preprocessing()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"resize_shorter": 0}, "preprocessing.resize_shorter: expected a positive integer; got 0"),
        ({"crop": "224"}, "preprocessing.crop: expected a positive integer; got '224'"),
        ({"crop": 300}, "preprocessing.crop: expected at most resize_shorter (256); got 300"),
        ({"mean": [0.5, 0.5]}, "preprocessing.mean: expected 3 numbers; got [0.5, 0.5]"),
        ({"std": [0.2, 0.0, 0.2]}, "preprocessing.std: expected 3 positive numbers; got [0.2, 0.0, 0.2]"),
        ({"std": None}, "preprocessing.std: expected 3 positive numbers; got None"),
    ],
)
def test_from_manifest_names_the_bad_key(change: dict, message: str) -> None:
    table = {"resize_shorter": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    with pytest.raises(ModelError) as excinfo:
        Preprocessing.from_manifest({**table, **change})
    assert str(excinfo.value) == message


def test_extreme_aspect_ratio_stays_small_and_close_to_the_reference() -> None:
    # 30000x2 used to be resized whole to 3840000x256 before cropping (gigabytes).
    rng = np.random.default_rng(7)
    strip = Image.fromarray(rng.integers(0, 256, size=(2, 30000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    strip.save(buffer, "PNG")
    decoded = decode(buffer.getvalue(), SPEC, max_pixels=MAX_PIXELS)
    assert decoded.tensor.shape == (3, 224, 224)
    small = Image.fromarray(rng.integers(0, 256, size=(2, 2000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.save(buffer, "PNG")
    tensor = decode(buffer.getvalue(), SPEC, max_pixels=MAX_PIXELS).tensor
    assert np.max(np.abs(tensor - reference(small))) <= 0.0176  # one 8-bit step at most
