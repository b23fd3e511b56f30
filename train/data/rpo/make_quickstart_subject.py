"""Draw the RPO quickstart's subject: four pictures of one synthetic "clock" (a red rim, a white face, two hands).

    python train/data/rpo/make_quickstart_subject.py        # writes train/data/rpo/quickstart_subject/

The pictures differ in size, position, background and file format, as a user's photos would: a PNG, a second PNG, a
JPEG stored sideways with an EXIF orientation tag (it reads upright once the tag is applied) and a WebP.
"""

from pathlib import Path

from PIL import Image, ImageDraw

FOLDER = Path(__file__).resolve().parent / "quickstart_subject"
# (size, centre as a fraction of the size, radius fraction, background colour, hour-hand angle)
VIEWS = [
    ((96, 96), (0.5, 0.5), 0.38, (226, 232, 240), "png"),
    ((120, 88), (0.42, 0.52), 0.36, (240, 228, 212), "png"),
    ((88, 112), (0.5, 0.45), 0.4, (214, 236, 220), "jpg"),
    ((80, 80), (0.55, 0.55), 0.34, (236, 220, 236), "webp"),
]


def draw_clock(size: tuple[int, int], centre: tuple[float, float], radius: float, background) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    cx, cy = centre[0] * size[0], centre[1] * size[1]
    r = radius * min(size)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 30, 40))  # the red rim
    face = 0.78 * r
    draw.ellipse([cx - face, cy - face, cx + face, cy + face], fill=(250, 250, 245))
    for dx, dy in ((0, -1), (1, 0), (0, 1), (-1, 0)):  # hour marks at 12, 3, 6 and 9
        draw.line([cx + dx * 0.6 * face, cy + dy * 0.6 * face, cx + dx * 0.9 * face, cy + dy * 0.9 * face],
                  fill=(40, 40, 40), width=2)  # fmt: skip
    draw.line([cx, cy, cx, cy - 0.75 * face], fill=(30, 30, 30), width=2)  # minute hand at 12
    draw.line([cx, cy, cx + 0.45 * face, cy + 0.2 * face], fill=(30, 30, 30), width=3)  # hour hand near 4
    return image


def main() -> None:
    FOLDER.mkdir(exist_ok=True)
    for index, (size, centre, radius, background, suffix) in enumerate(VIEWS):
        image = draw_clock(size, centre, radius, background)
        path = FOLDER / f"{index:02d}.{suffix}"
        if suffix == "jpg":  # stored rotated 90° counter-clockwise; orientation 6 tells readers to turn it back
            exif = Image.Exif()
            exif[0x0112] = 6
            image.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
        elif suffix == "webp":
            image.save(path, lossless=True)
        else:
            image.save(path)
        print(path)


if __name__ == "__main__":
    main()
