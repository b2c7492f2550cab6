"""--group-by-length (LLaVA's group_by_modality_length): each global batch's records ordered by length, so each
process's micro-batches hold samples of like length. The same global batches as without it, for 1 or N
processes; less padding; resumable; refused where the lengths cannot be read cheaply (parquet)."""
import random

import pytest

from conftest import cli_flags, train_says
from engineering.distributed import ResumableSampler
from engineering.memory_plan import padding_share


def sampler(n, world, rank, lengths=None, group=8, micro=2, epoch=0):
    s = ResumableSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=True, seed=3, drop_last=True)
    if lengths is not None:
        s.lengths, s.group, s.micro = lengths, group, micro
    s.set_epoch(epoch)
    return s


def steps(world, lengths, n=40, group=8, micro=2):
    """Each optimizer step's samples, per process and micro-batch: [step][rank][micro-batch] -> indices."""
    per_rank = [list(sampler(n, world, r, lengths, group, micro)) for r in range(world)]
    accum = group // (micro * world)
    out = []
    for k in range(len(per_rank[0]) // (micro * accum)):
        out.append([[per_rank[r][(k * accum + a) * micro:(k * accum + a + 1) * micro] for a in range(accum)]
                    for r in range(world)])
    return out


def test_the_same_global_batches_each_micro_batch_of_like_length():
    lengths = [random.Random(i).randint(1, 1000) for i in range(40)]
    for world in (1, 2, 4):
        plain, grouped = steps(world, None), steps(world, lengths)
        assert [sorted(sum(sum(s, []), [])) for s in plain] == [sorted(sum(sum(s, []), [])) for s in grouped]
        for step in grouped:  # the step's micro-batches, across processes, are consecutive runs of the sorted batch
            micro_batches = sorted((m for rank in step for m in rank), key=lambda m: -lengths[m[0]])
            flat = [lengths[i] for m in micro_batches for i in m]
            assert flat == sorted(flat, reverse=True)
    # 1 and 2 processes: the same global batch at every step
    assert [sorted(sum(sum(s, []), [])) for s in steps(1, lengths)] == \
           [sorted(sum(sum(s, []), [])) for s in steps(2, lengths)]


def test_a_resumed_grouped_sampler_continues_the_same_order():
    lengths = [(i * 37) % 101 for i in range(40)]
    whole = list(sampler(40, 2, 1, lengths))
    resumed = sampler(40, 2, 1, lengths)
    resumed.start = 6
    assert list(resumed) == whole[6:]


def test_grouping_cuts_the_padding_of_llava_665k_like_batches():
    plain = padding_share("2", 16, 128, 576, 2048, grouped=False)
    grouped = padding_share("2", 16, 128, 576, 2048, grouped=True)
    assert plain > 0.3 and grouped < 0.15 and grouped < plain / 2, (plain, grouped)


def test_parquet_data_with_group_by_length_is_refused(base, tmp_path, capsys):
    code, line = train_says(cli_flags(dict(stage="2", data=str(tmp_path / "shards" / "*.parquet"), init=base.init,
                                           group_by_length=True, out_dir=str(tmp_path / "out"))), capsys)
    assert code == 2 and "--group-by-length (stage 2) needs JSON / JSONL data" in line, line


@pytest.mark.parametrize("recipe", ["llava15-vicuna7b", "siglip-qwen25-7b", "siglip-qwen25-0.5b"])
def test_the_paper_recipes_group_stage_2_only(recipe):
    from engineering.config import stage_config
    assert [stage_config(recipe, s, {}).group_by_length for s in ("1", "1.5", "2")] == [False, False, True]
    assert not any(stage_config("demo", s, {}).group_by_length for s in ("1", "1.5", "2"))


def test_a_grouped_stage_trains_and_records_it(base, tmp_path):
    import json

    import train as T
    T.main(cli_flags(dict(stage="2", data=base.data["2"], image_folder=base.shapes, init=base.init, lr=1e-3,
                          max_steps=2, global_batch_size=8, batch_size=4, num_workers=0, bf16=False,
                          group_by_length=True, out_dir=str(tmp_path / "out"))))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["train_config"]
    assert saved["group_by_length"] is True
