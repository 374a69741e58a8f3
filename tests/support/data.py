"""A tiny captioned image data set: coloured shapes on a grey background, as LLaVA records (the
input of `massv generate`), shared by the pipeline tests of the Qwen2 and Gemma3 families."""

from __future__ import annotations

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (230, 200, 30), "purple": (140, 50, 170), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_image(colour: str, shape: str, big: bool):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), (235, 235, 235))
    d, r, c = ImageDraw.Draw(img), 40 if big else 20, 56
    box = (c - r, c - r, c + r, c + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=fill)
    return img


def shape_records(root) -> list[dict]:
    """The 36 shape images (every colour, shape and size) saved under `root` as PNGs, and their
    LLaVA records: "Describe the image." with the caption as the reference answer."""
    records = []
    for colour in COLOURS:
        for shape in SHAPES:
            for big in (False, True):
                name = f"{'big' if big else 'small'}_{colour}_{shape}"
                shape_image(colour, shape, big).save(root / f"{name}.png")
                caption = f"A {'big' if big else 'small'} {colour} {shape}."
                records.append({"id": name, "image": f"{name}.png", "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": caption}]})
    return records
