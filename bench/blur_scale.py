"""How the default blur score relates to the old server's full-resolution score.

Renders one photo-like scene (1/f texture, a dark lesion-like blob, thin
hairs) at several camera resolutions, blurs each with a Gaussian of sigma
0..4 pixels (at that resolution), adds mild sensor noise, encodes JPEG q=90,
and prints the old score (full decode, full resolution), ours (the default
path) and ours/old. Also prints decode times. On demand, not a test:

    .venv/bin/python bench/blur_scale.py [--noise 2.0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import time

import cv2
import numpy as np
from PIL import Image

from appliance.imaging import BLUR_SHORT_SIDE, Preprocessing, decode

SIZES = [(600, 450), (1024, 768), (1600, 1200), (2592, 1944), (4032, 3024)]
SIGMAS = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0]
THRESHOLD = 100.0


def make_scene(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A float32 RGB scene at the largest size; smaller cameras see it downscaled."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None].astype(np.float32)
    fx = np.fft.rfftfreq(width)[None, :].astype(np.float32)
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):  # 1/f amplitude spectrum: the statistics of natural images, at every scale
        spectrum = (rng.standard_normal(f.shape, np.float32) + 1j * rng.standard_normal(f.shape, np.float32)) / f
        t = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
        channels.append((t - t.mean()) / t.std())
    texture = np.stack(channels, axis=2) @ np.array([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.2, 0.3, 0.5]], np.float32).T
    img = texture * 18 + np.array([185, 135, 115], np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.hypot((xx - width * 0.5) / 1.3, yy - height * 0.5) < min(width, height) * 0.2
    img[blob] *= 0.55
    for _ in range(12):  # hairs: thin dark lines at any angle
        x0, slope = rng.uniform(0, width), rng.uniform(-1, 1)
        img[np.abs(xx - x0 - (yy - height / 2) * slope) < width / 2000] *= 0.45
    return img


def photo(scene: np.ndarray, size: tuple[int, int], sigma: float, noise: float, rng: np.random.Generator) -> bytes:
    """The scene as a camera of `size` with defocus `sigma` (its pixels) and sensor noise sees it, as JPEG."""
    img = cv2.resize(scene, size, interpolation=cv2.INTER_AREA)
    if sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0, noise, img.shape[:2] + (1,)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def timed_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, default=2.0, help="sensor noise sd in grey levels")
    parser.add_argument("--repeat", type=int, default=5, help="timing repetitions")
    args = parser.parse_args()
    spec = Preprocessing()
    rng = np.random.default_rng(1)
    scene = make_scene(*SIZES[-1])
    print(f"blur score: old = full resolution; ours = shorter side {BLUR_SHORT_SIDE} (default path)")
    print(f"{'size':>10} {'sigma':>5} {'old':>9} {'ours':>9} {'ours/old':>8}  old<{THRESHOLD:g} ours<{THRESHOLD:g}")
    timings = []
    for size in SIZES:
        for sigma in SIGMAS:
            data = photo(scene, size, sigma, args.noise, rng)
            old = decode(data, spec, max_pixels=10**9, blur_full_resolution=True).blur_score
            ours = decode(data, spec, max_pixels=10**9).blur_score
            print(
                f"{size[0]:>5}x{size[1]:<4} {sigma:>5.1f} {old:>9.1f} {ours:>9.1f} {ours / old:>8.2f}"
                f"  {'blurry' if old < THRESHOLD else 'sharp':>8} {'blurry' if ours < THRESHOLD else 'sharp':>9}"
            )
            if sigma == 0.0:
                full = timed_ms(lambda data=data: decode(data, spec, max_pixels=10**9, blur_full_resolution=True), args.repeat)
                fast = timed_ms(lambda data=data: decode(data, spec, max_pixels=10**9), args.repeat)
                timings.append((size, len(data), full, fast))
    print("\ndecode + blur + preprocess, median ms")
    print(f"{'size':>10} {'MB':>5} {'full':>7} {'default':>7}")
    for size, nbytes, full, fast in timings:
        print(f"{size[0]:>5}x{size[1]:<4} {nbytes / 1e6:>5.2f} {full:>7.1f} {fast:>7.1f}")


if __name__ == "__main__":
    main()
