"""Regenerate the bundled demo images (deterministic; PIL only): `python playground/make_demo_images.py`.

demo.png (768×768, the square 2×2 any-res case): a titled bar chart with value labels plus three coloured shapes.
wide_chart.png (1280×720, a 16:9 case): a 12-month bar chart. The plotted values are the constants below, so demos
and tests can check answers ("Which fruit sold the most?" → Apples, 42).
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT_DIR = Path(__file__).resolve().parent / "images"

DEMO_TITLE = "Fruit sold this week"
DEMO_BARS = {"Apples": 42, "Bananas": 27, "Cherries": 35, "Dates": 12}
DEMO_COLOURS = ((220, 60, 50), (240, 200, 40), (150, 30, 80), (140, 90, 50))

WIDE_TITLE = "Monthly rainfall in 2024 (mm)"
WIDE_BARS = {
    "Jan": 78, "Feb": 64, "Mar": 55, "Apr": 41, "May": 33, "Jun": 18,
    "Jul": 9, "Aug": 12, "Sep": 27, "Oct": 59, "Nov": 86, "Dec": 92,
}  # fmt: skip
WIDE_COLOUR = (50, 110, 200)


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font: same glyphs on every machine with the same Pillow."""
    return ImageFont.load_default(size=size)


def bar_chart(draw, box, bars, colours, y_max, label_size, value_size):
    """Axes, one bar per entry with its value above and its name below, inside box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=3)
    for tick in range(0, y_max + 1, y_max // 5):
        y = bottom - (bottom - top) * tick / y_max
        draw.line([(left - 8, y), (left, y)], fill="black", width=2)
        draw.text((left - 12, y), str(tick), fill="black", font=font(label_size - 4), anchor="rm")
    slot = (right - left) / len(bars)
    for i, ((name, value), colour) in enumerate(zip(bars.items(), colours)):
        x0, x1 = left + slot * (i + 0.18), left + slot * (i + 0.82)
        y = bottom - (bottom - top) * value / y_max
        draw.rectangle([x0, y, x1, bottom - 2], fill=colour, outline="black", width=2)
        centre = (x0 + x1) / 2
        draw.text((centre, y - 6), str(value), fill="black", font=font(value_size), anchor="md")
        draw.text((centre, bottom + 10), name, fill="black", font=font(label_size), anchor="mt")


def make_demo() -> Image.Image:
    image = Image.new("RGB", (768, 768), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    draw.text((384, 28), DEMO_TITLE, fill="black", font=font(40), anchor="mt")
    bar_chart(draw, (90, 110, 730, 500), DEMO_BARS, DEMO_COLOURS, y_max=50, label_size=26, value_size=30)
    # shapes row: red circle, blue square, green triangle
    draw.ellipse([110, 590, 250, 730], fill=(220, 40, 40), outline="black", width=3)
    draw.rectangle([314, 590, 454, 730], fill=(40, 80, 220), outline="black", width=3)
    draw.polygon([(588, 590), (518, 730), (658, 730)], fill=(40, 170, 70), outline="black", width=3)
    return image


def make_wide_chart() -> Image.Image:
    image = Image.new("RGB", (1280, 720), "white")
    draw = ImageDraw.Draw(image)
    draw.text((640, 26), WIDE_TITLE, fill="black", font=font(40), anchor="mt")
    colours = [WIDE_COLOUR] * len(WIDE_BARS)
    bar_chart(draw, (100, 110, 1240, 640), WIDE_BARS, colours, y_max=100, label_size=26, value_size=26)
    return image


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, image in (("demo.png", make_demo()), ("wide_chart.png", make_wide_chart())):
        path = OUT_DIR / name
        image.save(path, optimize=True)
        print(f"wrote {path} ({image.width}x{image.height}, {path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
