"""scripts/bench_ablation.py --quick runs every arm end to end and writes a valid report."""
import json
import os
import shutil
import sys

import forked
from conftest import MAIN


def test_bench_ablation_quick_writes_a_valid_report(tmp_path):
    sys.path.insert(0, os.path.join(MAIN, "scripts"))
    from bench_ablation import ARMS
    out = tmp_path / "ablation"
    proc = forked.run(["scripts/bench_ablation.py", "--quick", "--out-dir", str(out)], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "ablation.json").read_text())
    assert set(report["arms"]) == set(ARMS) and report["config"]["plan"] == {a: [0] for a in ARMS}
    for arm in report["arms"].values():
        assert arm["seeds"] == [0] and arm["settings"]["lengths"]["stage2_steps"] == 4
        for s in [arm["accuracy"], *arm["per_type"].values(), *arm["curve"].values()]:
            assert set(s) == {"mean", "std", "per_seed"} and len(s["per_seed"]) == 1
            assert 0.0 <= s["mean"] <= 1.0 and s["std"] == 0.0 and s["mean"] == s["per_seed"][0]
        assert set(arm["per_type"]) == {"colour", "count", "exists", "position", "shape"}
        assert list(arm["curve"]) == ["2", "4"]  # the snapshot and the final step
        assert set(arm["probe"]) == {"input", "middle", "last"}
        for layer in arm["probe"].values():
            assert set(layer) == {"object", "colour", "shape", "occupied"}
            assert all(0.0 <= v["mean"] <= 1.0 for v in layer.values())
    # every arm starts from the same stage-1 checkpoint: the probe of the LLM's input embeddings reads
    # the same stage-1 projector for llava; the stage-1.5 arms trained theirs, so theirs differ from it
    run = lambda arm: json.loads((out / "runs" / arm / "seed-0" / "result.json").read_text())  # noqa: E731
    assert run("llava")["seconds"]["stage1.5"] < run("victor")["seconds"]["stage1.5"]
    # the stage-1.5 checkpoints hold each arm's settings (the variant and its overrides took effect)
    cfg = lambda arm: json.loads((out / "runs" / arm / "seed-0" / "stage1.5" / "config.json").read_text())["victor"]  # noqa: E731
    assert cfg("victor-pool32")["pool_size"] == 32 and cfg("victor")["pool_size"] == 128
    assert cfg("croc")["matcher"] == "nearest" and cfg("croc")["stage15_attention"] == "mixed"
    assert cfg("vdep")["replace_ratio"] == 0.0 and cfg("vdep")["recon_target_offset"] == 1
    assert cfg("captions")["recon_weight"] == 0.0 and cfg("victor-recon0")["recon_weight"] == 0.0
    assert cfg("victor-replace0.9")["replace_ratio"] == 0.9
    assert not (out / "runs" / "llava" / "seed-0" / "stage1.5").exists()
    table = (out / "ablation.md").read_text()
    assert all(f"| {name} |" in table for name in ARMS)
    assert (out / "ablation.png").stat().st_size > 10_000
    assert table.strip() in proc.stdout  # the table is printed too
    # paired differences against both references, over the seed both ran (one: no interval)
    for ref in ("captions", "llava"):
        table_ = report["paired"][f"vs_{ref}"]
        assert set(table_) == set(ARMS) - {ref}
        for e in table_.values():
            assert e["seeds"] == [0] and e["overall"]["ci95"] is None and e["overall"]["verdict"] == "one seed"
            assert set(e["per_type"]) == {"colour", "count", "exists", "position", "shape"}
            assert len(e["test_sampling_se"]) == 1
    assert "Paired differences vs captions" in table and "stage 1.5: 3 steps; stage 2: 4 steps" in table
    # every arm answered the same questions (one 0/1 string per question, as many as the test set)
    assert len({len(run(a)["correct"]) for a in ARMS}) == 1 and len(run("victor")["correct"]) == 40
    for a in ARMS:  # the final accuracy over all 40; the curve's last point over its first 20, as its others
        r = run(a)
        assert r["accuracy"] == r["correct"].count("1") / 40 == report["arms"][a]["accuracy"]["mean"]
        assert r["curve"]["4"] == r["correct"][:20].count("1") / 20
    # run again with the same settings: every run is reused, nothing is trained
    again = forked.run(["scripts/bench_ablation.py", "--quick", "--out-dir", str(out)], timeout=600)
    assert again.returncode == 0 and "started" not in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "ablation.json").read_text())["config"]["reused_runs"] == len(ARMS)
    # a grid restored from its records (results and stage-1 records kept, checkpoints not): only the missing
    # run is trained, from its seed's stage 1 made again; the others are reused
    shutil.rmtree(out / "seeds" / "seed-0" / "stage1")
    os.remove(out / "runs" / "croc" / "seed-0" / "result.json")
    restored = forked.run(["scripts/bench_ablation.py", "--quick", "--out-dir", str(out)], timeout=600)
    assert restored.returncode == 0, restored.stdout[-2000:]
    started = [line.split()[-1] for line in restored.stdout.splitlines() if line.strip().startswith("started")]
    assert started == ["stage1-seed0", "arm-croc-seed0"] and "redoing" not in restored.stdout
    assert json.loads((out / "ablation.json").read_text())["config"]["reused_runs"] == len(ARMS) - 1
