"""
The engineering under victor's four files: what a reader of the method may skip.

victor.py (the method) imports nothing of this package; train.py and eval.py use it, and nothing here
imports them back; it uses victor.py's and data.py's own names (the model, the record vocabulary).
One module per concern:

    flags.py        named values -> command-line flags, ranges, the one-line errors (UsageError)
    config.py       TrainConfig (every train.py flag), the recipes, and how a stage's settings are made
    checkpoints.py  victor's checkpoints and the formats it reads and writes (LLaVA, llava-hf)
    records.py      data files: JSON / JSONL record stores, parquet shards, the validation pass
    batches.py      the loader, the batches a step takes, skipped-record accounting and its report
    distributed.py  torchrun: processes, DDP / FSDP2, all-reduce, resumable training states
    memory_plan.py  what each GPU will hold (train.py --plan and its verdict; refused before a run that cannot
                    fit), held to scripts/trace_step.py's trace of the real step
    reporting.py    metrics.jsonl, the progress bar (plain lines off a terminal), --report-to tensorboard / wandb
    reruns.py       the rerun rule: what the same command does with an out-dir; nothing trained is lost
    benchmarks.py   reading public benchmarks (MME, POPE, MMBench TSV) and their scores
    pictures.py     eval.py --visualize (the pool as a visual vocabulary; one image's replaced and reconstructed
                    tokens) and scripts/plot_curves.py
"""
