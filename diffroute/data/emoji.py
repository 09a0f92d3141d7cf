"""Build the emoji data set offline: Noto Color Emoji (and Symbola glyphs) rendered to 32x32 RGB, with CLDR-style
captions and a fixed held-out split. Run `python -m diffroute.data.emoji` (installs the fonts with apt if absent).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import unicodedata
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

NOTO = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SYMBOLA = Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf")
DATA_DIR = Path(__file__).parents[1] / "zoo" / "data"  # shipped with the zoo
SIZE = 32
HELD_OUT_PERCENT = 10
TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
VS16, ZWJ = 0xFE0F, 0x200D


def ensure_fonts() -> None:
    """Install Debian's emoji fonts if they are missing (needs root and the Debian mirror)."""
    if NOTO.is_file() and SYMBOLA.is_file():
        return
    if shutil.which("apt-get") is None:
        sys.exit(f"missing {NOTO} / {SYMBOLA}: install fonts-noto-color-emoji and fonts-symbola")
    subprocess.run(["apt-get", "install", "-y", "-q", "fonts-noto-color-emoji", "fonts-symbola"], check=True)


def _is_flag(seq: str) -> bool:
    cps = [ord(c) for c in seq]
    return (len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps)) or (cps[0] == 0x1F3F4 and len(cps) > 2)


def _package_name(seq: str, data: dict) -> str | None:
    entry = data.get(seq) or data.get(seq + chr(VS16))
    return entry["en"].strip(":").replace("_", " ").lower() if entry else None


def caption(seq: str, data: dict) -> str | None:
    """CLDR-style lower-case name: unicodedata for single code points, the `emoji` package for sequences
    ("flag: japan", "woman technologist: medium skin tone")."""
    core = "".join(c for c in seq if ord(c) != VS16)
    if len(core) == 1:
        return unicodedata.name(core, "").lower() or None
    if _is_flag(core):
        name = _package_name(seq, data)
        return f"flag: {name}" if name else None
    tones = [TONES[ord(c)] for c in core if ord(c) in TONES]
    if tones:
        base = "".join(c for c in seq if ord(c) not in TONES)
        name = _package_name(base, data) or _package_name(base.replace(chr(VS16), ""), data)
        if not name:  # no toneless twin (mixed-tone couples): drop the tone words from the sequence's own name
            full = _package_name(seq, data)
            if not full:
                return None
            name = re.sub(r"\s*\b(medium-light|medium-dark|light|medium|dark) skin tone\b", "", full).strip()
        unique = list(dict.fromkeys(tones))
        return f"{name}: {', '.join(unique)}"
    return _package_name(seq, data)


def render_noto(font: ImageFont.FreeTypeFont, seq: str) -> np.ndarray | None:
    """32x32 RGB on white, or None when the font has no single glyph for the sequence."""
    left, top, right, bottom = font.getbbox(seq)
    if bottom - top < 50 or right - left > 160:  # no glyph (zero height) or several glyphs side by side
        return None
    canvas = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((-left, -top), seq, font=font, embedded_color=True)
    return _square_on_white(canvas)


def render_symbola(font: ImageFont.FreeTypeFont, cmap: set[int], seq: str) -> np.ndarray | None:
    core = "".join(c for c in seq if ord(c) != VS16)
    if len(core) != 1 or ord(core) not in cmap:
        return None
    mask = font.getmask(core)
    if mask.getbbox() is None:
        return None
    glyph = Image.frombytes("L", mask.size, bytes(mask))
    canvas = Image.new("RGBA", glyph.size, (0, 0, 0, 0))
    canvas.putalpha(glyph)
    return _square_on_white(canvas)


def _square_on_white(rgba: Image.Image) -> np.ndarray:
    box = rgba.getbbox() or (0, 0, *rgba.size)
    rgba = rgba.crop(box)
    side = int(max(rgba.size) * 1.08) + 2
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return np.asarray(square.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS), dtype=np.uint8)


def held_out(cap: str) -> bool:
    """Fixed split by a hash of the caption: independent of order, library versions and what else rendered."""
    return int(hashlib.sha256(cap.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def build(out_dir: Path = DATA_DIR) -> dict:
    import emoji
    from fontTools.ttLib import TTFont

    ensure_fonts()
    if not features.check("raqm"):
        print("warning: Pillow has no raqm: emoji sequences will not shape and are skipped", file=sys.stderr)
    noto = ImageFont.truetype(str(NOTO), 109)
    symbola = ImageFont.truetype(str(SYMBOLA), 64)
    cmap = set(TTFont(str(SYMBOLA)).getBestCmap())
    data = emoji.EMOJI_DATA
    fully = emoji.STATUS["fully_qualified"]
    records, seen, skipped = [], set(), {"no caption": 0, "duplicate caption": 0, "no single glyph": 0}
    for seq in sorted(s for s, v in data.items() if v["status"] == fully):
        cap = caption(seq, data)
        if not cap:
            skipped["no caption"] += 1
            continue
        if cap in seen:
            skipped["duplicate caption"] += 1
            continue
        img = render_noto(noto, seq)
        if img is None:
            skipped["no single glyph"] += 1
            continue
        seen.add(cap)
        records.append((seq, cap, img, render_symbola(symbola, cmap, seq)))
    captions = [r[1] for r in records]
    split = np.array([held_out(c) for c in captions])
    mono_idx = np.array([i for i, r in enumerate(records) if r[3] is not None], dtype=np.int64)
    arrays = {
        "images": np.stack([r[2] for r in records]),
        "captions": np.array(captions),
        "sequences": np.array([r[0] for r in records]),
        "held_out": split,
        "symbola_index": mono_idx,
        "symbola_images": np.stack([records[i][3] for i in mono_idx]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = out_dir / ".emoji32.npz.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out_dir / "emoji32.npz")
    report = {
        "pairs": len(records),
        "train": int((~split).sum()),
        "held_out": int(split.sum()),
        "single_code_point": sum(len(r[0].replace(chr(VS16), "")) == 1 for r in records),
        "sequences": sum(len(r[0].replace(chr(VS16), "")) > 1 for r in records),
        "symbola_glyphs": len(mono_idx),
        "skipped": skipped,
        "raqm": features.check("raqm"),
    }
    (out_dir / "emoji32.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def load(path: Path | None = None) -> dict[str, np.ndarray]:
    """The shipped data set as arrays (see build() for the keys)."""
    path = path or DATA_DIR / "emoji32.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: rebuild it with `python -m diffroute.data.emoji`.")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


DOMAINS = ("emoji", "symbola")


def calibration_captions(n: int) -> list[str]:
    """`n` training captions (seeded draw): what searches and calibrations tune on, disjoint from the held-out
    captions that every figure is scored on."""
    data = load()
    caps = [str(c) for c in data["captions"][~data["held_out"]]]
    return [caps[i] for i in np.random.default_rng(0).choice(len(caps), n, replace=False)]


def domain(data: dict, name: str) -> dict:
    """The arrays of one image domain: `emoji` (Noto colour, what the model was trained on) or `symbola` (the
    monochrome Symbola glyphs of the same captions, for adaptation). The held-out split is the captions' own, so a
    held-out caption is held out in both domains."""
    if name == "emoji":
        return {k: data[k] for k in ("images", "captions", "held_out")}
    if name == "symbola":
        idx = data["symbola_index"]
        return {"images": data["symbola_images"], "captions": data["captions"][idx], "held_out": data["held_out"][idx]}
    raise ValueError(f"unknown image domain {name!r}; known: {', '.join(DOMAINS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    print(json.dumps(build(args.out), indent=2))


if __name__ == "__main__":
    main()
