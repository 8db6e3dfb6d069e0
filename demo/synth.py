"""The synthetic Korean video dataset (`python -m demo.synth OUT --num N --seed S`): a coloured shape moves across a
plain background, one short video each, with 2-5 Korean captions that name what is seen.

  Attribute space (ATTRIBUTES), 6 x 5 x 4 x 4 = 480 combinations:
    colour      red 빨간색, orange 주황색, yellow 노란색, green 초록색, blue 파란색, purple 보라색
    shape       circle 원, square 사각형, triangle 삼각형, star 별, cross 십자가
    motion      right 오른쪽, left 왼쪽, up 위, down 아래
    background  black 검은색, white 흰색, gray 회색, skyblue 하늘색
  Caption grammar: CAPTION_TEMPLATES, with {C} a colour word, {S} a shape word and its particle ({i} 이/가,
  {n} 은/는, chosen by the last syllable's final consonant), {M} a direction ("오른쪽으로"), {B} / {Bn} a background
  word before 배경 / as a predicate, {V} / {Va} a verb, finite / before a noun ("움직인다" / "움직이는"); each
  attribute has synonyms (빨간 / 빨간색 / 붉은, 원 / 동그라미, 오른쪽으로 / 우측으로, 검은 / 까만, ...). Every caption
  names all four attributes, so parse_caption_attributes can read each one back from a reference or a model's
  caption. A video gets 2-5 captions from different templates.
  Splits (--heldout): "combinations", 20% of the 480 combinations held out, half for val and half for test, so val
  and test each hold combinations that never occur in train nor in each other: a model must compose attributes,
  not memorise them. "pairs" (harder): 6 colour-shape pairs never occur in train (3 in val, 3 in test), so no
  training video shows, say, a red star at all; the same 20% of the combinations leave train.
"""
import argparse
import itertools
import logging
import random
import time
from pathlib import Path

import cv2
import numpy as np

from data import SPLITS, Sample, VideoError, write_manifest
from infra.errors import UserError, user_errors

ATTRIBUTES = {
    "colour": {"red": "빨간색", "orange": "주황색", "yellow": "노란색", "green": "초록색", "blue": "파란색",
               "purple": "보라색"},
    "shape": {"circle": "원", "square": "사각형", "triangle": "삼각형", "star": "별", "cross": "십자가"},
    "motion": {"right": "오른쪽", "left": "왼쪽", "up": "위", "down": "아래"},
    "background": {"black": "검은색", "white": "흰색", "gray": "회색", "skyblue": "하늘색"},
}
# The words a caption may use for each value (the synonyms of the caption grammar); the four tables share no word.
CAPTION_WORDS = {
    "colour": {"red": ["빨간", "빨간색", "붉은"], "orange": ["주황색", "주황", "오렌지색"], "yellow": ["노란", "노란색"],
               "green": ["초록색", "녹색", "초록"], "blue": ["파란", "파란색", "푸른"], "purple": ["보라색", "보랏빛"]},
    "shape": {"circle": ["원", "동그라미"], "square": ["사각형", "네모"], "triangle": ["삼각형", "세모"],
              "star": ["별", "별 모양"], "cross": ["십자가", "십자 모양"]},
    "motion": {"right": ["오른쪽으로", "우측으로"], "left": ["왼쪽으로", "좌측으로"], "up": ["위로", "위쪽으로"],
               "down": ["아래로", "아래쪽으로"]},
    "background": {"black": ["검은", "검은색", "까만", "검정색"], "white": ["흰", "흰색", "하얀", "하얀색"],
                   "gray": ["회색", "잿빛"], "skyblue": ["하늘색", "하늘빛"]},
}
# The nouns among them (-색, -빛) also work as a predicate: "배경은 회색이다", not "배경은 검은이다".
_BACKGROUND_NOUNS = {value: [word for word in words if word[-1] in "색빛"]
                     for value, words in CAPTION_WORDS["background"].items()}
_VERBS = [("움직인다", "움직이는"), ("이동한다", "이동하는"), ("나아간다", "나아가는")]  # (finite, before a noun)
_DIRECTION_VERBS = {"up": [("올라간다", "올라가는")], "down": [("내려간다", "내려가는")]}
CAPTION_TEMPLATES = [
    "{C} {S}{i} {B} 배경 위에서 {M} {V}.",
    "{B} 배경에서 {C} {S}{i} {M} {V}.",
    "{C} {S}{i} {M} {V}. 배경은 {Bn}이다.",
    "{M} {Va} {C} {S}{i} {B} 배경 위에 있다.",
    "{B} 배경 위를 {C} {S}{i} {M} {V}.",
    "{C} {S} 하나가 {B} 배경을 가로질러 {M} {V}.",
    "{C} {S}{n} {B} 배경 속에서 {M} {V}.",
    "영상에는 {B} 배경 위에서 {M} {Va} {C} {S}{i} 나온다.",
]
# Endings a caption word may carry (Korean particles attach to the word): 원이, 십자가가, 검은색이다, ...
_PARTICLES = {"", "이", "가", "은", "는", "을", "를", "의", "도", "와", "과", "이다", "이고", "이며", "으로", "로", "에", "에서"}


def _particle(word: str, after_consonant: str, after_vowel: str) -> str:
    """Korean particles follow the last syllable: 원이 / 동그라미가 (a Hangul syllable's final consonant is
    (code - 0xAC00) % 28, 0 for none)."""
    return after_consonant if (ord(word[-1]) - 0xAC00) % 28 else after_vowel


def make_caption(template: str, words: dict) -> str:
    """A caption from `template` with its slots filled by `words` (one choice per slot of caption_choices)."""
    shape, (verb, verb_adnominal) = words["shape"], words["verb"]
    return template.format(C=words["colour"], S=shape, i=_particle(shape, "이", "가"), n=_particle(shape, "은", "는"),
                           M=words["motion"], B=words["background"], Bn=words["background_noun"], V=verb,
                           Va=verb_adnominal)


def caption_choices(attributes: dict[str, str]) -> dict[str, list]:
    """For each template slot, the words that may fill it for these attributes."""
    choices = {name: CAPTION_WORDS[name][value] for name, value in attributes.items()}
    choices["background_noun"] = _BACKGROUND_NOUNS[attributes["background"]]
    choices["verb"] = _VERBS + _DIRECTION_VERBS.get(attributes["motion"], [])
    return choices


def parse_caption_attributes(caption: str) -> dict[str, str | None]:
    """The attribute values a caption names (None where it names none, or several): the inverse of the grammar."""
    tokens = [token.strip(".,!?\"'") for token in caption.split()]
    found = {}
    for name, table in CAPTION_WORDS.items():
        values = {value for value, forms in table.items() for form in forms for token in tokens
                  if token.startswith(form.split()[0]) and token[len(form.split()[0]):] in _PARTICLES}
        found[name] = values.pop() if len(values) == 1 else None
    return found


def attribute_scores(predictions: list[dict], attributes: dict[str, dict]) -> dict[str, float]:
    """The share of predicted captions ({"id", "prediction"}) that name each attribute right, and all four at once;
    `attributes` maps a sample id to its true values."""
    parsed = [(parse_caption_attributes(p["prediction"]), attributes[p["id"]]) for p in predictions]
    shares = {name: float(np.mean([found[name] == true[name] for found, true in parsed])) for name in ATTRIBUTES}
    return shares | {"all four": float(np.mean([found == true for found, true in parsed]))}


_COLOUR_RGB = {"red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 170, 60),
               "blue": (40, 80, 225), "purple": (140, 60, 190)}
_BACKGROUND_RGB = {"black": (25, 25, 25), "white": (235, 235, 235), "gray": (128, 128, 128), "skyblue": (150, 200, 240)}
_DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
_SHIFT = 4  # OpenCV draws at 1/16-pixel precision with shift=4, so the motion is smooth, not pixel-stepped


def _shape_outline(shape: str, radius: float) -> np.ndarray:
    """Polygon vertices (K, 2) of a shape of the given radius around the origin (image y points down)."""
    if shape == "square":
        unit = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "triangle":
        unit = [(0, -1), (0.95, 0.7), (-0.95, 0.7)]
    elif shape == "star":  # five points, inner radius 0.45
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        unit = np.stack([np.cos(angles), np.sin(angles)], 1) * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None]
    else:  # cross, arms 0.7 radius wide
        a = 0.35
        unit = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
                (-a, -a)]
    return np.asarray(unit, dtype=np.float64) * radius


def render_video(attributes: dict[str, str], rng: np.random.Generator, size: int = 64,
                 frames: int = 16) -> np.ndarray:
    """uint8 RGB (frames, size, size, 3): the shape, radius 11-15% of the frame with a dark outline, travels 35-50%
    of the frame in a straight line; colours are jittered and every pixel of every frame gets noise."""
    background = np.clip(np.array(_BACKGROUND_RGB[attributes["background"]]) + rng.integers(-10, 11, 3), 0, 255)
    colour = np.clip(np.array(_COLOUR_RGB[attributes["colour"]]) + rng.integers(-15, 16, 3), 0, 255).tolist()
    radius, travel = rng.uniform(0.11, 0.15) * size, rng.uniform(0.35, 0.5) * size
    direction = np.array(_DIRECTIONS[attributes["motion"]])
    low, high = radius + 1, size - radius - 1  # the whole path stays inside the frame:
    start = rng.uniform(low, high, 2)          # anywhere across the motion, and along it with room to travel
    start = np.where(direction > 0, rng.uniform(low, high - travel, 2), start)
    start = np.where(direction < 0, rng.uniform(low + travel, high, 2), start)
    outline = _shape_outline(attributes["shape"], radius)
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = background
    for t in range(frames):
        centre = start + direction * travel * t / max(frames - 1, 1)
        if attributes["shape"] == "circle":
            point, r = tuple(int(v) for v in np.round(centre * 2**_SHIFT)), int(round(radius * 2**_SHIFT))
            cv2.circle(video[t], point, r, colour, -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(video[t], point, r, (20, 20, 20), 1, cv2.LINE_AA, _SHIFT)
        else:
            polygon = np.round((outline + centre) * 2**_SHIFT).astype(np.int32)
            cv2.fillPoly(video[t], [polygon], colour, cv2.LINE_AA, _SHIFT)
            cv2.polylines(video[t], [polygon], True, (20, 20, 20), 1, cv2.LINE_AA, _SHIFT)
    # sensor-like noise, uniform in [-6, 6] (sigma 3.7): cheaper to draw than Gaussian noise of the same spread
    noise = rng.integers(-6, 7, video.shape, dtype=np.int16)
    return np.clip(video + noise, 0, 255).astype(np.uint8)


def write_video(frames: np.ndarray, path, fps: int = 8) -> Path:
    """uint8 RGB (F, H, W, 3) -> an .mp4 file (MPEG-4 Part 2, 'mp4v': the encoder every OpenCV build has)."""
    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write an mp4v video here; check the folder is writable")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def attribute_combinations() -> list[dict[str, str]]:
    """All 480 combinations, in a fixed order."""
    names = list(ATTRIBUTES)
    return [dict(zip(names, values)) for values in itertools.product(*(ATTRIBUTES[name] for name in names))]


def _synth_sample(out_dir: Path, seed: int, split: str, k: int, attributes: dict[str, str], size: int, frames: int,
                  fps: int) -> Sample:
    """Render, write and caption one video; its random stream depends only on (seed, split, k)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), k])
    video = write_video(render_video(attributes, rng, size, frames), out_dir / "videos" / f"{split}{k:05d}.mp4", fps)
    choices = caption_choices(attributes)
    templates = rng.choice(len(CAPTION_TEMPLATES), size=rng.integers(2, 6), replace=False)  # 2-5 captions
    captions = [make_caption(CAPTION_TEMPLATES[t], {slot: words[rng.integers(len(words))]
                                                    for slot, words in choices.items()}) for t in templates]
    return Sample(f"{split}{k:05d}", video, captions, split, dict(attributes))


def heldout_combinations(seed: int, fraction: float = 0.2) -> dict[str, list[dict[str, str]]]:
    """The "combinations" split: `fraction` of the 480 combinations held out, half for val and half for test."""
    combinations = attribute_combinations()
    random.Random(seed).shuffle(combinations)
    num_heldout = round(fraction * len(combinations))
    return {"val": combinations[:num_heldout // 2], "test": combinations[num_heldout // 2:num_heldout],
            "train": combinations[num_heldout:]}


def heldout_pairs(seed: int) -> dict[str, list[dict[str, str]]]:
    """The "pairs" split: one (colour, shape) pair per colour is held out, 6 of the 30 pairs, and every combination
    holding one (6 x 16 = 96 of 480, 20% as in "combinations") leaves train: no training video shows, say, a red
    star, though red things and stars are everywhere in it. Val gets three held-out pairs, test the other three.
    The shapes are dealt so that each shape loses at most two of its six colours."""
    rng = random.Random(seed)
    colours, shapes = list(ATTRIBUTES["colour"]), list(ATTRIBUTES["shape"])
    rng.shuffle(colours)
    dealt = rng.sample(shapes, len(shapes)) + rng.sample(shapes, len(colours) - len(shapes))
    pairs = list(zip(colours, dealt))
    held = {"val": pairs[:3], "test": pairs[3:]}
    pools = {"train": [], "val": [], "test": []}
    for combination in attribute_combinations():
        pair = (combination["colour"], combination["shape"])
        pools[next((split for split, chosen in held.items() if pair in chosen), "train")].append(combination)
    for pool in pools.values():
        rng.shuffle(pool)
    return pools


HELDOUT = {"combinations": heldout_combinations, "pairs": heldout_pairs}


def synth_dataset(out_dir, num: int = 500, seed: int = 42, *, num_val: int | None = None,
                  num_test: int | None = None, heldout: str = "combinations", size: int = 64, frames: int = 16,
                  fps: int = 8) -> Path:
    """Write `num` synthetic videos (out_dir/videos/*.mp4) and out_dir/manifest.jsonl; returns the manifest's path.

    val and test (10% of `num` each unless given) use the held-out combinations, train the rest; `heldout` says
    which (HELDOUT: "combinations", 20% of the 4-attribute combinations; "pairs", every combination holding one
    of 6 held-out colour-shape pairs), and depends on `seed` only. Videos cycle through their split's
    combinations, so each is equally represented.
    """
    num_val = round(0.1 * num) if num_val is None else num_val
    num_test = round(0.1 * num) if num_test is None else num_test
    if num_val + num_test > num:
        raise UserError(f"num_val + num_test ({num_val} + {num_test}) exceeds num ({num})")
    if heldout not in HELDOUT:
        raise UserError(f"heldout must be one of {list(HELDOUT)}, got {heldout!r}")
    pools = HELDOUT[heldout](seed)
    counts = {"train": num - num_val - num_test, "val": num_val, "test": num_test}
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    samples = [_synth_sample(out_dir, seed, split, k, pools[split][k % len(pools[split])], size, frames, fps)
               for split in SPLITS for k in range(counts[split])]
    return write_manifest(samples, out_dir / "manifest.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the synthetic Korean video dataset")
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=500, help="videos in all splits")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-val", type=int, default=None, help="default: 10%% of --num")
    parser.add_argument("--num-test", type=int, default=None, help="default: 10%% of --num")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--heldout", choices=list(HELDOUT), default="combinations",
                        help="what val and test hold that train never shows: 4-attribute combinations, or "
                             "colour-shape pairs (harder: the model must compose a colour and a shape it never "
                             "saw together)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    manifest = synth_dataset(args.out, args.num, args.seed, num_val=args.num_val, num_test=args.num_test,
                             heldout=args.heldout, size=args.size, frames=args.frames)
    megabytes = sum(file.stat().st_size for file in (args.out / "videos").glob("*.mp4")) / 2**20
    logging.getLogger(__name__).info("wrote %s: %d videos, %.1f MiB, %.1f s", manifest, args.num, megabytes,
                                     time.perf_counter() - start)


if __name__ == "__main__":
    with user_errors():
        main()
