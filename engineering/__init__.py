"""
The engineering under victor's four files: what a reader of the method may skip.

victor.py (the method) imports nothing of this package; data.py, train.py and eval.py use it; nothing
here imports them back. One module per concern:

    flags.py        named values -> command-line flags, ranges, the one-line errors (UsageError)
    config.py       TrainConfig (every train.py flag), the recipes, and how a stage's settings are made
    checkpoints.py  victor's checkpoints and the formats it reads and writes (LLaVA, llava-hf)
    records.py      data files: JSON / JSONL record stores, parquet shards, the validation pass
    batches.py      the loader, the batches a step takes, skipped-record accounting and its report
    distributed.py  torchrun: processes, DDP / FSDP2, all-reduce, resumable training states
    memory_plan.py  what each GPU will hold (train.py --plan and its verdict; refused before a run that cannot
                    fit), held to scripts/trace_step.py's trace of the real step
    reporting.py    metrics.jsonl, the progress bar, --report-to tensorboard / wandb
    benchmarks.py   reading public benchmarks (MME, POPE, MMBench TSV) and their scores
    pictures.py     eval.py --visualize (pool rows, reconstruction errors) and --curves
"""
