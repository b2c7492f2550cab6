"""
Write a checkpoint (victor's own, the original LLaVA code's or llava-hf's) as a transformers
LlavaForConditionalGeneration directory, which transformers, vLLM and lmms-eval load:

    python scripts/export_llava_hf.py out/demo/stage2 out/demo/hf
    python scripts/export_llava_hf.py CKPT OUT --overwrite   # into a directory that is not empty

It never writes into the checkpoint it reads, and refuses a model llava-hf would compute differently
(engineering/checkpoints.py, export_llava_hf, says which): each refusal is one line, nothing written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engineering.benchmarks import InputError  # noqa: E402
from engineering.checkpoints import export_llava_hf, load_checkpoint  # noqa: E402


def export(checkpoint: str, out: str, overwrite: bool = False) -> str:
    """The checkpoint (any format load_checkpoint reads) as a llava-hf directory at out; InputError (one line)
    for a mistake."""
    if not os.path.isdir(checkpoint):
        raise InputError(f"{checkpoint}: no such checkpoint directory (run `python train.py` first)")
    if os.path.isdir(out) and os.path.samefile(out, checkpoint):
        raise InputError(f"{out}: that is the checkpoint being read; give another directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InputError(f"{out}: the directory is not empty; give a new or empty one, or add --overwrite to "
                         "write into it")
    try:
        model, tokenizer, image_processor = load_checkpoint(checkpoint)
    except ValueError as e:  # not a checkpoint: the reason, in one line
        raise InputError(str(e)) from None
    try:
        out = export_llava_hf(model, tokenizer, image_processor, out)
    except ValueError as e:  # where llava-hf would compute something else: the reason, no directory
        raise InputError(f"{checkpoint}: {e}") from None
    print(f"wrote a LlavaForConditionalGeneration directory to {out} (transformers, vLLM and lmms-eval load it)")
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("checkpoint", help="the checkpoint to read")
    ap.add_argument("out", help="the llava-hf directory to write (new or empty)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a directory that is not empty (never the checkpoint read)")
    args = ap.parse_args(argv)
    try:
        return export(args.checkpoint, args.out, args.overwrite)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
