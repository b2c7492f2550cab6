"""
The built-in small world: what the demo, the tests and the ablation train on, with no download.

    shapes.py       the shapes generator (images of coloured shapes on a 3 x 3 grid; captions, detailed
                    captions, questions of five types) and its word-level tokenizer
    demo_base.py    the demo's base models (a tiny CLIP tower and a tiny Llama), pretrained once and
                    committed in base/ with their record (demo_base.json): `python shapes_world/demo_base.py`
                    checks them, `--rebuild OUT` pretrains them again
    base/           the committed weights (safetensors), configs and tokenizer

A reader of the method may skip this folder; a reader of an experiment should not (docs/world.md).
"""
