"""Recreate the embedded sample images from the DeepForest wheel (run by hand, not imported).

    pip download deepforest==2.1.0 --no-deps -d /tmp/df && unzip -q /tmp/df/deepforest-*.whl -d /tmp/df/wheel
    python gfm_fast/data/sample/make_sample.py /tmp/df/wheel/deepforest/data
    python -m gfm_fast.data build neon_sites=gfm_fast/data/sample/images/neon_sites \
        neon_yell=gfm_fast/data/sample/images/neon_yell --gsd neon_sites=0.1 --gsd neon_yell=0.1 \
        --out gfm_fast/data/sample/shards --prefix geopile-sample --shard-size 300KB --seed 0

Layouts: ``images/neon_sites/<SITE>/<tile>.jpg`` (class folders, one per NEON site) and
``images/neon_yell/<tile>.{jpg,png}`` (a flat folder). Tiles are cut on a regular grid and saved
at modest JPEG quality to keep the package small (see NOTICE.md for the attribution).
"""
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
JPEG_QUALITY = 80

# (source image, tile stem, class folder or None for the flat folder, tile size, max tiles, stride)
PLAN = [
    ("OSBS_029.png", "OSBS_029", "OSBS", 200, 4, 200),
    ("SOAP_031.png", "SOAP_031", "SOAP", 200, 4, 200),
    ("SOAP_061.png", "SOAP_061", "SOAP", 200, 4, 200),
    ("2019_YELL_2_541000_4977000_image_crop.png", "YELL_541000_4977000", "YELL", 256, 12, 256),
    ("2019_YELL_2_528000_4978000_image_crop2.png", "YELL_528000_4978000", None, 320, 10, 640),
]
PNG_TILES = 2  # the first flat tiles are kept lossless (PNG) so that both formats are shipped
PNG_SHRINK = 2  # ... at half size, since lossless aerial imagery is large


def tiles(image: Image.Image, size: int, stride: int):
    width, height = image.size
    for top in range(0, height - size + 1, stride):
        for left in range(0, width - size + 1, stride):
            yield top, left, image.crop((left, top, left + size, top + size))


def main(src_dir: str) -> None:
    out = HERE / "images"
    for name, stem, site, size, limit, stride in PLAN:
        image = Image.open(Path(src_dir) / name).convert("RGB")
        folder = out / "neon_sites" / site if site else out / "neon_yell"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (top, left, tile) in enumerate(tiles(image, size, stride)):
            if i >= limit:
                break
            base = folder / f"{stem}_y{top:04d}_x{left:04d}"
            if site is None and i < PNG_TILES:
                tile.resize((size // PNG_SHRINK, size // PNG_SHRINK), Image.BILINEAR).save(base.with_suffix(".png"), optimize=True)
            else:
                tile.save(base.with_suffix(".jpg"), quality=JPEG_QUALITY, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1])
