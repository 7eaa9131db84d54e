"""Fresh photos for the vLLM benches: the repository's test photos, one pixel changed in each.

New bytes and new pixels, so neither vLLM's prefix or encoder cache nor phicapd's journal has
seen them. Pillow only: the vLLM venv imports this too (``vllm_profile.py``).
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data" / "images"
NAMES = ["camera.png", "chelsea.png", "coffee.png", "coins.png", "horse.png", "hubble_deep_field.jpg", "rocket.jpg"]


def fresh_images(out: Path, n: int, rng: random.Random) -> list[Path]:
    """n photos, each with one pixel set to a random colour: new bytes and new pixels."""
    out.mkdir(parents=True)
    made = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        image = Image.open(PHOTOS / name).convert("RGB")
        image.putpixel((rng.randrange(image.width), rng.randrange(image.height)), tuple(rng.randbytes(3)))
        path = out / f"{i:03d}-{Path(name).stem}.png"
        image.save(path, format="PNG", compress_level=1)
        made.append(path)
    return made
