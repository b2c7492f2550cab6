"""
The synthetic "shapes" world (docs/world.md) and its offline tokenizer: what the demo, the tests
and the ablation train on. Images of 1-3 coloured shapes on a 3 x 3 grid over clutter; for each, a short
caption (stage 1), a detailed caption (stage 1.5) and questions of five types (stage 2 and the test set).

Make the shapes data by hand (train.py does it on first use):
    python shapes_world/shapes.py --out data/shapes
    python shapes_world/shapes.py --out data/shapes-clutter3 --clutter 3    # the same scenes, heavier clutter

Clutter levels (ShapesSpec.clutter, CLUTTER_LEVELS): 0 is the world's own light clutter (noisy grey, a
few faint lines). Levels 1-5 add, rising, a blotchy texture to the background, distractor shapes in muted
colours and sizes no object has, and grey lines; none of it comes within CLUTTER_MARGIN pixels of an
object, and every object is drawn last, whole. The extra clutter has its own random stream (from the
image's noise seed), so every level shows the same objects and asks the same questions with the same
answers; level 0 is bitwise the data the world made before levels existed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if __name__ == "__main__":  # run as a script: the repository's modules by their names
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import CHATML_TEMPLATE, DETAIL_PROMPT, IMAGE_PLACEHOLDER  # noqa: E402
from engineering.benchmarks import MC_SUFFIX  # noqa: E402  (LLaVA's multiple-choice prompt, which the world's questions use)

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 205, 35)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("1", "2", "3")
LETTERS = "ABCD"
# what each clutter level adds over level 0: the texture's amplitude (grey levels), how many distractor
# shapes and how many extra lines
CLUTTER_LEVELS = {0: None,
                  1: dict(texture=12, distractors=4, lines=3),
                  2: dict(texture=22, distractors=9, lines=6),
                  3: dict(texture=32, distractors=15, lines=10),
                  4: dict(texture=44, distractors=24, lines=16),
                  5: dict(texture=56, distractors=36, lines=24)}
CLUTTER_MARGIN = 2  # pixels of level-0 background kept around every object


@dataclass
class ShapesSpec:
    image_size: int = 96
    grid: int = 3
    max_objects: int = 3
    num_train_images: int = 8000
    num_test_images: int = 1000
    questions_per_image: int = 4  # stage 2: one record per question, of distinct kinds
    seed: int = 0
    clutter: int = 0  # a key of CLUTTER_LEVELS: 0 the world's own light clutter, 1-5 heavier

    def __post_init__(self):
        if self.clutter not in CLUTTER_LEVELS:
            raise ValueError(f"clutter must be one of {sorted(CLUTTER_LEVELS)}, got {self.clutter!r}")


def spec_record(spec: ShapesSpec) -> dict:
    """The spec as data files and run settings record it; clutter only when it is not 0, so a level-0
    world's records are those made before clutter levels existed."""
    record = dict(spec.__dict__)
    if record["clutter"] == 0:
        del record["clutter"]
    return record


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill):
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)


def draw_scene(rng: random.Random, spec: ShapesSpec):
    """One image and its geometry: (image, objects, masks), masks {"objects": [bool HxW per object],
    "clutter": bool HxW, the pixels the level's extra clutter drew (none at level 0)}."""
    s, g = spec.image_size, spec.grid
    cell = s // g
    # cluttered background: noisy grey, a few faint lines and dots in muted colours
    noise_seed = rng.getrandbits(63)
    noise = np.random.default_rng(noise_seed).normal(128, 14, (s, s, 1))
    im = Image.fromarray(np.repeat(noise.clip(0, 255).astype(np.uint8), 3, axis=2))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 5)):
        grey = tuple(rng.randint(90, 170) for _ in range(3))
        d.line([(rng.randrange(s), rng.randrange(s)), (rng.randrange(s), rng.randrange(s))], fill=grey, width=1)
    objects = random_objects(rng, spec)
    placed = []
    for o in objects:
        c = CELLS.index(o["cell"])
        half = (cell * (0.42 if o["size"] == "large" else 0.27))
        cx = (c % g) * cell + cell / 2 + rng.uniform(-1.5, 1.5)
        cy = (c // g) * cell + cell / 2 + rng.uniform(-1.5, 1.5)
        placed.append((o, cx, cy, half))
    object_masks = []
    for o, cx, cy, half in placed:
        mask = Image.new("L", (s, s), 0)
        draw_shape(ImageDraw.Draw(mask), o["shape"], cx, cy, half, 255)
        object_masks.append(np.asarray(mask) > 0)
    clutter_mask = np.zeros((s, s), dtype=bool)
    level = CLUTTER_LEVELS[spec.clutter]
    if level:  # its own stream: the main one draws the same at every level
        im, clutter_mask = add_clutter(im, object_masks, np.random.default_rng([noise_seed, spec.clutter]), level)
        d = ImageDraw.Draw(im)
    for o, cx, cy, half in placed:
        draw_shape(d, o["shape"], cx, cy, half, COLOURS[o["colour"]])
    return im, objects, {"objects": object_masks, "clutter": clutter_mask}


def add_clutter(im: Image.Image, object_masks: list[np.ndarray], gen: np.random.Generator, level: dict):
    """A clutter level's texture, distractors and lines over the background, none of it within
    CLUTTER_MARGIN pixels of an object. Returns (image, the mask of pixels the distractors and lines drew)."""
    s = im.size[0]
    # texture: blotches of light and dark grey (coarse noise, upsampled smoothly), slightly tinted
    coarse = (gen.normal(0, 1, (s // 12, s // 12)) * level["texture"]).astype(np.float32)
    blotch = np.asarray(Image.fromarray(coarse).resize((s, s), Image.BICUBIC))
    tint = gen.normal(0, 4, 3)
    base = np.asarray(im).astype(np.float32) + blotch[..., None] + tint
    layer = Image.new("RGB", (s, s))
    drawn = Image.new("L", (s, s), 0)
    d, dm = ImageDraw.Draw(layer), ImageDraw.Draw(drawn)

    def muted():  # any hue at low saturation: a grey mixed with 25-50 % of a random colour
        grey, hue, a = gen.uniform(70, 190), gen.uniform(0, 255, 3), gen.uniform(0.25, 0.5)
        return tuple(int(v) for v in (1 - a) * grey + a * hue)

    for _ in range(level["distractors"]):
        shape = SHAPES[gen.integers(len(SHAPES))]
        cx, cy, half = gen.uniform(0, s), gen.uniform(0, s), gen.uniform(1.5, 5.5)  # below a small object's 8.6
        fill = muted()
        draw_shape(d, shape, cx, cy, half, fill)
        draw_shape(dm, shape, cx, cy, half, 255)
    for _ in range(level["lines"]):
        xy = [tuple(gen.uniform(0, s, 2)), tuple(gen.uniform(0, s, 2))]
        width = int(gen.integers(1, 3))
        fill = muted()
        d.line(xy, fill=fill, width=width)
        dm.line(xy, fill=255, width=width)
    keep_out = np.zeros((s, s), dtype=bool)
    for m in object_masks:
        keep_out |= m
    keep_out = np.asarray(Image.fromarray(keep_out).filter(ImageFilter.MaxFilter(2 * CLUTTER_MARGIN + 1))) > 0
    mask = (np.asarray(drawn) > 0) & ~keep_out
    out = np.where(mask[..., None], np.asarray(layer).astype(np.float32), base)
    return Image.fromarray(out.clip(0, 255).round().astype(np.uint8)), mask


def draw_shapes_image(rng: random.Random, spec: ShapesSpec):
    """One image: 1..max_objects shapes of distinct colours in distinct grid cells over clutter."""
    im, objects, _ = draw_scene(rng, spec)
    return im, objects


def random_objects(rng: random.Random, spec: ShapesSpec) -> list[dict]:
    """1..max_objects objects of distinct colours in distinct cells, in reading order (what an image shows)."""
    n = rng.randint(1, spec.max_objects)
    cells = rng.sample(range(spec.grid ** 2), n)
    colours = rng.sample(sorted(COLOURS), n)
    objects = [{"colour": colour, "shape": rng.choice(SHAPES), "size": rng.choice(SIZES), "cell": CELLS[c]}
               for c, colour in zip(cells, colours)]
    return sorted(objects, key=lambda o: CELLS.index(o["cell"]))


def short_caption(objects) -> str:
    return " , ".join(f"{o['colour']} {o['shape']}" for o in objects) + " ."


def detailed_caption(objects) -> str:
    n = len(objects)
    head = f"There {'is' if n == 1 else 'are'} {n} object{'s' if n > 1 else ''} ."
    return " ".join([head] + [f"A {o['size']} {o['colour']} {o['shape']} at the {o['cell']} ." for o in objects])


def make_question(rng: random.Random, objects, kind: str, multiple_choice: bool):
    """One question about the image: (question text, answer text, options or None).

    Multiple-choice questions list 3-4 options (all of them for shape and count) after the question.
    """
    o = rng.choice(objects)
    if kind == "colour":
        q, a, pool = f"What colour is the object at the {o['cell']} ?", o["colour"], sorted(COLOURS)
    elif kind == "shape":
        q, a, pool = f"What shape is the {o['colour']} object ?", o["shape"], list(SHAPES)
    elif kind == "position":
        q, a, pool = f"Where is the {o['colour']} {o['shape']} ?", o["cell"], list(CELLS)
    elif kind == "count":
        q, a, pool = "How many objects are there ?", str(len(objects)), list(NUMBERS)
    elif kind == "exists":  # POPE-style: half present, half absent (absent ones share colour or shape)
        present = {(x["colour"], x["shape"]) for x in objects}
        if rng.random() < 0.5:
            colour, shape = o["colour"], o["shape"]
        else:
            absent = [(c, sh) for c in COLOURS for sh in SHAPES if (c, sh) not in present]
            colour, shape = rng.choice(absent)
        q = f"Is there a {colour} {shape} in the image ? Answer yes or no ."
        return q, ("yes" if (colour, shape) in present else "no"), None
    else:
        raise ValueError(kind)
    if not multiple_choice:
        return q, a, None
    options = [a] + rng.sample([p for p in pool if p != a], min(len(pool), 4) - 1)
    rng.shuffle(options)
    # the options are listed, and the answer is the option's text: chance is 1 / len(options)
    return q + "\nOptions : " + " , ".join(options) + " .", a, options


QUESTION_KINDS = ("colour", "shape", "position", "count", "exists")


def text_conversation(rng: random.Random, spec: ShapesSpec, questions: int = 4,
                      question_mix: dict | None = None) -> tuple[list[dict], list[str]]:
    """The world's language without images, for pretraining the demo's LLM: a scene told as its detailed
    caption, then `questions` questions about it (open or multiple-choice) and their answers. The kinds
    are distinct (QUESTION_KINDS, sampled), or with `question_mix` ({kind: integer weight}) each one
    drawn independently with those weights. Returns (chat messages, the question kinds)."""
    objects = random_objects(rng, spec)
    if question_mix is None:
        kinds = rng.sample(QUESTION_KINDS, questions)
    else:
        unknown = set(question_mix) - set(QUESTION_KINDS)
        if unknown or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in question_mix.values()):
            raise ValueError(f"question_mix: integer weights >= 0 for kinds of {QUESTION_KINDS}, got {question_mix}")
        pool = [k for k in QUESTION_KINDS for _ in range(question_mix.get(k, 0))]
        if not pool:
            raise ValueError(f"question_mix: at least one weight must be > 0, got {question_mix}")
        kinds = [rng.choice(pool) for _ in range(questions)]
    messages = []
    for t, kind in enumerate(kinds):
        q, a, _ = make_question(rng, objects, kind, multiple_choice=rng.random() < 0.5)
        prompt = f"{detailed_caption(objects)}\n{q}" if t == 0 else q
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}]
    return messages, kinds


def make_shapes_dataset(root: str, spec: ShapesSpec | None = None) -> dict:
    """Generate the shapes dataset into root (deterministic from spec.seed). Returns the file paths."""
    spec = spec or ShapesSpec()
    if not 1 <= spec.questions_per_image <= len(QUESTION_KINDS):
        raise ValueError(f"questions_per_image must be 1..{len(QUESTION_KINDS)} (one per kind), "
                         f"got {spec.questions_per_image}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(spec.seed)
    stage1, stage15, stage2, test = [], [], [], []
    for i in range(spec.num_train_images + spec.num_test_images):
        name = f"images/{i:06d}.png"
        im, objects = draw_shapes_image(rng, spec)
        im.save(os.path.join(root, name))
        rid = f"shapes-{i:06d}"
        if i >= spec.num_train_images:  # held-out test images: one question each
            kind = QUESTION_KINDS[i % len(QUESTION_KINDS)]
            q, a, options = make_question(rng, objects, kind, multiple_choice=kind != "exists")
            test.append({"id": rid, "image": name, "type": kind, "options": options,
                         "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}"},
                                           {"from": "gpt", "value": a}]})
            continue
        stage1.append({"id": rid, "image": name, "conversations": [
            {"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": short_caption(objects)}]})
        stage15.append({"id": rid, "image": name, "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{DETAIL_PROMPT}"},
            {"from": "gpt", "value": detailed_caption(objects)}]})
        # questions_per_image questions of distinct kinds per image, one per record: each question
        # then sits right after its image, as in the test set (as 4-turn conversations the demo
        # learned less in the same minutes: docs/ablation-first-world/demo_log.md)
        for t, kind in enumerate(rng.sample(QUESTION_KINDS, spec.questions_per_image)):
            q, a, _ = make_question(rng, objects, kind, multiple_choice=rng.random() < 0.5)
            stage2.append({"id": f"{rid}-q{t}", "image": name, "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}"}, {"from": "gpt", "value": a}]})
    files = {"stage1": "stage1.json", "stage1.5": "stage1_5.json", "stage2": "stage2.json", "test": "test.jsonl"}
    for key, recs in (("stage1", stage1), ("stage1.5", stage15), ("stage2", stage2)):
        with open(os.path.join(root, files[key]), "w") as f:
            json.dump(recs, f)
    with open(os.path.join(root, files["test"]), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in test)
    with open(os.path.join(root, "spec.json"), "w") as f:
        json.dump(spec_record(spec), f)
    return {k: os.path.join(root, v) for k, v in files.items()}


def shapes_files(root: str, spec: ShapesSpec | None = None) -> dict:
    """The shapes dataset's files, generated on first use (or when the spec changed)."""
    spec = spec or ShapesSpec()
    spec_file = os.path.join(root, "spec.json")
    if os.path.isfile(spec_file):
        with open(spec_file) as f:
            if json.load(f) == spec_record(spec):
                return {k: os.path.join(root, v) for k, v in
                        (("stage1", "stage1.json"), ("stage1.5", "stage1_5.json"),
                         ("stage2", "stage2.json"), ("test", "test.jsonl"))}
    return make_shapes_dataset(root, spec)


SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_shapes_tokenizer():
    """A word-level tokenizer for the shapes vocabulary, built offline, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = set(("user assistant system " + DETAIL_PROMPT + " " + MC_SUFFIX +
                 " yes no There is are object objects Options "
                 "A at the What colour shape Where How many Is there a in image ? Answer or . , : of").split())
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBERS) | set(LETTERS)
    words |= {w for c in CELLS for w in c.split()}
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = {piece for w in words for piece, _ in pre.pre_tokenize_str(w)}
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=SPECIAL_TOKENS[2:],
                                   chat_template=CHATML_TEMPLATE)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out", default="data/shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clutter", type=int, default=0, choices=sorted(CLUTTER_LEVELS),
                    help="background clutter level: 0 the world's own, 1-5 heavier (CLUTTER_LEVELS)")
    args = ap.parse_args()
    paths = make_shapes_dataset(args.out, ShapesSpec(seed=args.seed, clutter=args.clutter))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
