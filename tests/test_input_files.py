"""Damaged or unusual input files, in process: data readers, model folders, and pickle weights (model.allow_pickle)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.tiny_models import save_tiny_models
from tuneyard.rlhf.preference_recipe import check_reward_model
from tuneyard.training.config import DataConfig, DataSource, ModelConfig
from tuneyard.training.data.sources import read_sources
from tuneyard.training.errors import UserError
from tuneyard.training.model import check_model_source, load_model, load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def rows_of(path, fmt: str = "messages") -> list[dict]:
    return read_sources([DataSource(path=str(path))], DataConfig(format=fmt, train=[str(path)]), 0, "train")


MESSAGE_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_a_text_corpus_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"one\ntwo \xff\n")
    with pytest.raises(UserError, match=f"{path}:2: not UTF-8 text"):
        rows_of(path, "text")


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(MESSAGE_ROW) + "\r\n").encode() * 2)
    assert rows_of(path) == [MESSAGE_ROW, MESSAGE_ROW]


def test_an_empty_json_file_is_called_empty(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("")
    with pytest.raises(UserError, match="the file is empty"):
        rows_of(path)


def test_a_parquet_file_cut_short(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole, cut = tmp_path / "whole.parquet", tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"row {i}"} for i in range(50)]), whole)
    assert len(rows_of(whole, "text")) == 50
    cut.write_bytes(whole.read_bytes()[:-30])
    with pytest.raises(UserError, match=f"{cut}: not a readable Parquet file"):
        rows_of(cut, "text")


def test_a_safetensors_header_that_is_not_json(models, tmp_path):
    folder = shutil.copytree(models["causal"], tmp_path / "model")
    (folder / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 200)
    with pytest.raises(UserError, match="is damaged \\(its header is not valid safetensors metadata\\)"):
        check_model_source(str(folder))


def test_a_sharded_model_missing_a_shard(models, tmp_path):
    folder = shutil.copytree(models["causal"], tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="lacks the weight shards model-00002-of-00002.safetensors"):
        check_model_source(str(folder))


def test_a_config_without_model_type(models, tmp_path):
    folder = shutil.copytree(models["causal"], tmp_path / "model")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(UserError, match="has no 'model_type'"):
        check_model_source(str(folder))


def test_a_missing_tokenizer_folder_names_the_key(tmp_path):
    cfg = ModelConfig(init="scratch", architecture={"model_type": "llama"}, tokenizer=str(tmp_path / "tok"))
    with pytest.raises(UserError, match=f"model.tokenizer: '{tmp_path / 'tok'}' does not exist"):
        load_tokenizer(cfg)


def test_a_missing_reward_model(tmp_path):
    with pytest.raises(UserError, match=f"reward.model: '{tmp_path / 'final'}' does not exist"):
        check_reward_model(str(tmp_path / "final"))


# pickle weights: refused unless model.allow_pickle, then loaded as they are


def test_pickle_weights_are_refused_by_default(models):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(models["pickle"])))
    with pytest.raises(UserError) as info:
        load_model(ModelConfig(name_or_path=str(models["pickle"])), tokenizer)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "unpickling can run code" in message
    assert "Convert them to safetensors" in message and "model.allow_pickle: true" in message


def test_pickle_weights_load_when_allowed(models):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(models["pickle"])))
    model = load_model(ModelConfig(name_or_path=str(models["pickle"]), allow_pickle=True, dtype="fp32"), tokenizer)
    saved = torch.load(models["pickle"] / "pytorch_model.bin", weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items() if name in state)
    assert torch.equal(state["model.embed_tokens.weight"], saved["model.embed_tokens.weight"])


def test_safetensors_win_over_a_pickle_beside_them(models, tmp_path):
    """A checkpoint-like folder: safetensors weights plus optimizer/RNG pickles that from_pretrained never reads."""
    folder = shutil.copytree(models["causal"], tmp_path / "checkpoint-2")
    for name in ("optimizer.pt", "training_args.bin", "rng_state.pth", "pytorch_model.bin"):
        (folder / name).write_bytes(b"not read")
    check_model_source(str(folder), allow_pickle=False)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    load_model(ModelConfig(name_or_path=str(folder)), tokenizer)  # the .bin is never unpickled


def test_a_pickled_reward_model_is_refused_unless_allowed(models):
    path = str(models["classifier-pickle"])
    with pytest.raises(UserError, match="reward.model: .* pickle files \\(pytorch_model.bin\\)"):
        check_reward_model(path, allow_pickle=False)
    check_reward_model(path)  # None: the loader judges, as the driver's preflight calls it
    check_reward_model(path, allow_pickle=True)
    cfg = ModelConfig(name_or_path=path, allow_pickle=True, dtype="fp32")
    classifier = load_model(cfg, load_tokenizer(cfg), task="sequence-classification")
    saved = torch.load(models["classifier-pickle"] / "pytorch_model.bin", weights_only=True)
    assert torch.equal(classifier.score.weight, saved["score.weight"])
