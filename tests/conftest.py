"""Shared fixtures: tiny random models (the same classes as the paper's), the shapes tokenizer, data."""
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

from engineering.checkpoints import save_checkpoint  # noqa: E402
from shapes_world import shapes as SH  # noqa: E402
from victor import VictorConfig, VictorModel  # noqa: E402

MAIN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_DATA = {"1": "stage1.json", "1.5": "stage1_5.json", "2": "stage2.json"}


def tiny_config(vision="clip", **overrides) -> VictorConfig:
    """A ~100k-parameter model: 32x32 images, patch 8 -> 16 visual tokens (12 replaced), LLM width 32."""
    from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig
    vcls = CLIPVisionConfig if vision == "clip" else SiglipVisionConfig
    vconf = vcls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=8)
    tok = SH.build_shapes_tokenizer()
    lconf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    values = dict(vision_config=vconf.to_dict(), llm_config=lconf.to_dict(), pool_size=32)
    values.update(overrides)
    return VictorConfig(**values)


def tiny_model(seed=0, **overrides) -> VictorModel:
    torch.manual_seed(seed)
    return VictorModel(tiny_config(**overrides))


def save_base_models(model, root, tokenizer, image_processor) -> tuple[str, str]:
    """Save a tiny model's tower (+ image processor) and LLM (+ tokenizer) as base-model dirs."""
    vdir, ldir = str(root / "vision"), str(root / "llm")
    model.vision_tower.save_pretrained(vdir)
    image_processor.save_pretrained(vdir)
    model.llm.save_pretrained(ldir)
    tokenizer.save_pretrained(ldir)
    return vdir, ldir


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a shared, busy CPU); restored afterwards.
    A test module asks for it with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def shapes_tokenizer():
    return SH.build_shapes_tokenizer()


@pytest.fixture(scope="session")
def tiny_image_processor():
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes dataset (32 px images to match the tiny model); one stage-2 record per image."""
    root = str(tmp_path_factory.mktemp("shapes"))
    SH.make_shapes_dataset(root, SH.ShapesSpec(image_size=32, num_train_images=64, num_test_images=20,
                                             questions_per_image=1))
    return root


@pytest.fixture(scope="session")
def base(tmp_path_factory, shapes_dir, shapes_tokenizer, tiny_image_processor):
    """A tiny CLIP tower + processor ("vision"), a tiny Llama + shapes tokenizer ("llm"), and a
    full victor checkpoint built from them ("init": the common starting point of the stage runs)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("base")
    vision_dir, llm_dir, init_dir = str(root / "vision"), str(root / "llm"), str(root / "init")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(vision_dir)
    tiny_image_processor.save_pretrained(vision_dir)
    tok = shapes_tokenizer
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    torch.manual_seed(1)
    model = VictorModel(VictorConfig(vision_model=vision_dir, llm=llm_dir, pool_size=32))
    save_checkpoint(model, init_dir, tok, tiny_image_processor)
    return SimpleNamespace(shapes=shapes_dir, vision=vision_dir, llm=llm_dir, init=init_dir,
                           data={s: os.path.join(shapes_dir, f) for s, f in STAGE_DATA.items()})


# -----------------------------------------------------------------------------
# Running train.py as a subprocess (torchrun tests)


def subprocess_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def together(*calls):
    """Call each of calls (each one starting a subprocess and waiting for it) at the same time, in threads; returns
    their results in order, raising the first failure once all have ended. The subprocesses are independent and
    single-threaded (OMP_NUM_THREADS=1): one run alone leaves a core idle much of the time."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if not r.get("done")], [r for r in rows if r.get("done")]


def cli_flags(values: dict) -> list[str]:
    """TrainConfig overrides as train.py flags (dicts as JSON, bools as --x / --no-x)."""
    flags = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            flags += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return flags


def crash_while_saving_then_resume(cfg, tmp_path, monkeypatch):
    """Stage 1.5 from cfg(out_dir, **overrides) (saving every 2 steps) three times: uninterrupted into tmp_path/ref;
    into tmp_path/run, the process dying while it moves step-4's state into place (step-2 is then the newest
    complete state); and resumed from there (--resume auto). Returns (ref, run)."""
    import train as T
    from engineering import distributed as DI
    ref, run = tmp_path / "ref", tmp_path / "run"
    T.train_stage(cfg(ref), "1.5")
    die_on_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        T.train_stage(cfg(run), "1.5")
    monkeypatch.undo()
    states = run / "checkpoints"
    assert sorted(os.listdir(states)) == ["step-2", "step-4.tmp"]
    assert DI.latest_training_state(str(states)) == str(states / "step-2")
    T.train_stage(cfg(run, resume="auto"), "1.5")
    return ref, run


def die_on_second_rename(monkeypatch):
    """os.replace raises on its second call: the process is killed while moving its second saved training
    state into place (step-N.tmp -> step-N), leaving the first complete and the second half-written."""
    real_replace, calls = os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_second_rename)


def train_says(argv, capsys=None) -> tuple[int, str]:
    """train.main(argv) ending in a mistake: (exit status, its one line). A mistake of the user's is exit 2
    with one line on stderr; a stage that had to stop is exit 1 with its line."""
    import train as T
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    if isinstance(e.value.code, str):
        return 1, e.value.code
    err = capsys.readouterr().err if capsys else ""
    assert "Traceback" not in err and err.endswith("\n"), err
    return e.value.code, err.strip().splitlines()[-1]
