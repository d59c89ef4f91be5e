"""Convergence curves as a PNG, with pillow only: the one plotting helper of the studies in this folder.

    from plot import draw_curves, seed_points
    draw_curves([("title", {"arm": [[x, y_seed0, y_seed1, ...], ...]})], "curves.png", xlabel="compute")
"""

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def draw_curves(panels, path, xlabel, marker_x=None, marker_label="mid | post"):
    """A PNG (pillow only) of convergence curves: one panel per (title, {arm: [[x, y_seed0, y_seed1, ...]]}),
    log-scale y, the mean line with the min-max band over seeds, and a dashed line at `marker_x`
    (labelled `marker_label`: where the mid-trained arm switches to post-training)."""
    font = ImageFont.load_default()
    colours = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189)]
    pw, ph, ml, mr, mt, mb = 560, 400, 70, 20, 40, 60
    img = Image.new("RGB", (pw * len(panels), ph), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    for p, (title, arms) in enumerate(panels):
        ox = p * pw
        xs = [pt[0] for pts in arms.values() for pt in pts]
        ys = [v for pts in arms.values() for pt in pts for v in pt[1:]]
        x0, x1 = min(xs), max(xs)
        ly0, ly1 = math.floor(math.log10(min(ys)) * 4) / 4, math.ceil(math.log10(max(ys)) * 4) / 4
        X = lambda x: ox + ml + (x - x0) / (x1 - x0) * (pw - ml - mr)
        Y = lambda y: mt + (ly1 - math.log10(y)) / (ly1 - ly0) * (ph - mt - mb)
        draw.rectangle([X(x0), Y(10 ** ly1), X(x1), Y(10 ** ly0)], outline="black")
        for e in range(math.floor(ly0), math.ceil(ly1) + 1):
            for m in (1, 1.5, 2, 3, 5, 7):
                v = m * 10.0 ** e
                if ly0 <= math.log10(v) <= ly1:
                    draw.line([X(x0), Y(v), X(x1), Y(v)], fill=(225, 225, 225))
                    draw.text((X(x0) - 6, Y(v)), f"{v:g}", fill="black", font=font, anchor="rm")
        for i in range(6):
            x = x0 + i * (x1 - x0) / 5
            draw.text((X(x), Y(10 ** ly0) + 6), f"{x:.0f}", fill="black", font=font, anchor="mt")
        draw.text((X((x0 + x1) / 2), ph - 22), xlabel, fill="black", font=font, anchor="mt")
        draw.text((ox + pw / 2, 14), title, fill="black", font=font, anchor="mt")
        if marker_x is not None:
            for yy in range(int(Y(10 ** ly1)), int(Y(10 ** ly0)), 8):
                draw.line([X(marker_x), yy, X(marker_x), yy + 4], fill=(120, 120, 120))
            draw.text((X(marker_x) + 4, Y(10 ** ly0) - 4), marker_label, fill=(90, 90, 90), font=font, anchor="lb")
        for a, (arm, pts) in enumerate(arms.items()):
            c = colours[a % len(colours)]
            band = [(X(pt[0]), Y(max(pt[1:]))) for pt in pts] + [(X(pt[0]), Y(min(pt[1:]))) for pt in pts[::-1]]
            draw.polygon(band, fill=c + (50,))
            draw.line([(X(pt[0]), Y(float(np.mean(pt[1:])))) for pt in pts], fill=c, width=2)
            draw.line([ox + pw - 200, mt + 14 + 16 * a, ox + pw - 180, mt + 14 + 16 * a], fill=c, width=3)
            draw.text((ox + pw - 175, mt + 14 + 16 * a), arm, fill="black", font=font, anchor="lm")
    img.save(path)


def seed_points(curves, key):
    """{seed: [(x, {key: y, ...}), ...]} (every seed at the same x) -> [[x, y_seed0, y_seed1, ...], ...]."""
    cs = list(curves.values())
    return [[pt[0]] + [c[i][1][key] for c in cs] for i, pt in enumerate(cs[0])]
