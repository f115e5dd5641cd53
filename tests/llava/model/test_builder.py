"""Checkpoint folders: save/load round trip, sharding, meta-device streaming load, spec key layout, clear
errors, atomic saves, no network."""
import json
import logging
import os
import re
import shutil
import socket

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import llava.model.builder as builder
from llava.errors import CheckpointError, InputError
from llava.model.builder import (
    SMALL_MODEL_NAME,
    build_small_model,
    load_pretrained_model,
    parse_size,
    save_pretrained,
)
from tests.llava.model.damage import BAD_FOLDERS, edit_weights, tree, two_shards

SAMPLE = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is the color of the bar?<|eot_id|>"


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def ckpt(small_checkpoint, tmp_path):
    """A private, writable copy of the small model's checkpoint."""
    return shutil.copytree(small_checkpoint, tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------
def test_round_trip_is_bit_exact(small_model, ckpt):
    tok, model = small_model
    tok2, model2, image_processor, context_len = load_pretrained_model(ckpt)
    assert_same_weights(model, model2)
    assert model2.config.to_dict() == model.config.to_dict() == json.loads((ckpt / "config.json").read_text())
    assert tok2(SAMPLE).input_ids == tok(SAMPLE).input_ids
    assert len(tok2) == len(tok)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        assert getattr(tok2, attr) == getattr(tok, attr), attr
    assert context_len == model.mm_config.tokenizer_model_max_length == 8192
    assert image_processor.size == {"height": 384, "width": 384}
    assert not model2.training and next(model2.parameters()).dtype == torch.float32


def test_sharded_checkpoint_loads_identically(small_model, ckpt):
    _, model = small_model
    state = load_file(str(ckpt / "model.safetensors"))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, shard_keys in halves.items():
        save_file({k: state[k] for k in shard_keys}, str(ckpt / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in shard_keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (ckpt / "model.safetensors").unlink()
    _, model2, _, _ = load_pretrained_model(ckpt)
    assert_same_weights(model, model2)


def test_builtin_name_is_the_small_model(small_model):
    tok, model = small_model
    tok2, model2, _, _ = load_pretrained_model(SMALL_MODEL_NAME)
    assert_same_weights(model, model2)
    assert tok2(SAMPLE).input_ids == tok(SAMPLE).input_ids


def test_loading_needs_no_network(small_model, ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access during loading")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    tok2, model2, _, _ = load_pretrained_model(ckpt)
    assert_same_weights(small_model[1], model2)


# ---------------------------------------------------------------------------------------------
# state-dict layout (spec 1.4)
# ---------------------------------------------------------------------------------------------
_VT = r"model\.vision_tower\.vision_tower\.vision_model\."
KEY_PATTERNS = [
    r"model\.transformer\.wte\.weight",
    *[rf"model\.transformer\.blocks\.\d+\.{m}\.weight"
      for m in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out")],
    r"model\.transformer\.ln_f\.weight",
    r"model\.transformer\.ff_out\.weight",
    *[rf"model\.mm_projector\.{i}\.{p}" for i in (0, 2) for p in ("weight", "bias")],
    r"model\.image_newline",
    _VT + r"embeddings\.patch_embedding\.weight",
    _VT + r"embeddings\.patch_embedding\.bias",
    _VT + r"embeddings\.position_embedding\.weight",
    *[_VT + rf"encoder\.layers\.\d+\.{m}\.{p}"
      for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")],
    _VT + r"post_layernorm\.weight",
    _VT + r"post_layernorm\.bias",
]


@pytest.mark.shapes
def test_state_dict_keys_match_spec(small_model):
    _, model = small_model
    state = model.state_dict()
    hits = {p: 0 for p in KEY_PATTERNS}
    for key in state:
        assert not key.startswith("lm_head") and ".head." not in key, key
        matched = [p for p in KEY_PATTERNS if re.fullmatch(p, key)]
        assert len(matched) == 1, f"{key} matches {matched}"
        hits[matched[0]] += 1
    assert all(hits.values()), [p for p, n in hits.items() if not n]

    cfg = model.config
    n_layers, d, mlp = cfg.llada.n_layers, cfg.llada.d_model, cfg.llada.mlp_hidden_size
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.transformer\.blocks\.(\d+)\.", k))}
    assert blocks == set(range(n_layers))
    vis_layers = {int(m.group(1)) for k in state if (m := re.match(_VT + r"encoder\.layers\.(\d+)\.", k))}
    assert vis_layers == set(range(cfg.vision.num_hidden_layers - 1))  # the last SigLIP layer is dropped

    hv, emb = cfg.mm.mm_hidden_size, cfg.llada.embedding_size
    shapes = {
        "model.transformer.wte.weight": (emb, d),
        "model.transformer.ff_out.weight": (emb, d),
        "model.transformer.ln_f.weight": (d,),
        "model.transformer.blocks.0.ff_proj.weight": (mlp, d),
        "model.transformer.blocks.0.up_proj.weight": (mlp, d),
        "model.transformer.blocks.0.ff_out.weight": (d, mlp),
        "model.transformer.blocks.0.q_proj.weight": (d, d),
        "model.mm_projector.0.weight": (d, hv),
        "model.mm_projector.0.bias": (d,),
        "model.mm_projector.2.weight": (d, d),
        "model.image_newline": (d,),
        _VT.replace("\\", "") + "embeddings.patch_embedding.weight": (hv, 3, 14, 14),
        _VT.replace("\\", "") + "embeddings.position_embedding.weight": (729, hv),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


# ---------------------------------------------------------------------------------------------
# bad checkpoint folders (the cases are in tests/llava/model/damage.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_checkpoint_folder(case, ckpt, tmp_path):
    damage, error, message = BAD_FOLDERS[case]
    damage(ckpt)
    before = tree(tmp_path)
    with pytest.raises(error, match=message):
        load_pretrained_model(ckpt)
    assert tree(tmp_path) == before  # nothing written, nothing removed


def test_symlinked_shard_inside_the_folder_loads(small_model, ckpt, tmp_path):
    """Only the index's text is checked: a hub-cache style shard symlinked to a blob elsewhere still loads."""
    two_shards(ckpt)
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    shutil.move(ckpt / "model-00001-of-00002.safetensors", blob)
    (ckpt / "model-00001-of-00002.safetensors").symlink_to(blob)
    _, model2, _, _ = load_pretrained_model(ckpt)
    assert_same_weights(small_model[1], model2)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_model(tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


def test_unexpected_keys_only_warn(small_model, ckpt, caplog):
    edit_weights(ckpt, lambda s: s.update({"model.extra_head.weight": torch.ones(3)}))
    with caplog.at_level(logging.WARNING, logger="llava"):
        _, model2, _, _ = load_pretrained_model(ckpt)
    assert_same_weights(small_model[1], model2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model.extra_head.weight" in r.getMessage() and "unused" in r.getMessage() for r in warnings)


# ---------------------------------------------------------------------------------------------
# atomic saves
# ---------------------------------------------------------------------------------------------
def test_save_replaces_existing_folder(small_model, tmp_path):
    tok, model = small_model
    target = save_pretrained(model, tok, tmp_path / "out")
    (target / "stale.txt").write_text("from an older save")
    _, other = build_small_model(seed=1)
    save_pretrained(other, tok, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp / backup folders left
    assert not (target / "stale.txt").exists()
    _, loaded, _, _ = load_pretrained_model(target)
    assert_same_weights(other, loaded)
    (tmp_path / "plain").mkdir()  # the checkpoint folder gets normal umask permissions (mkdtemp gives 0700)
    assert target.stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("shard_size", ["5GB", "1MB"])
def test_saved_files_get_umask_permissions(small_model, tmp_path, shard_size):
    """safetensors creates its files 0600; the weights get the same permissions as config.json (0644 under the
    usual umask 022), so a checkpoint shared by copying is readable as a whole."""
    tok, model = small_model
    target = save_pretrained(model, tok, tmp_path / "out", max_shard_size=shard_size)
    (tmp_path / "plain.txt").write_text("x")
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    weights = sorted(target.glob("*.safetensors"))
    assert (len(weights) == 1) == (shard_size == "5GB")  # one file, or several shards
    assert {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()} == {p.name: expected for p in target.iterdir()}


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_no_partial_folder(small_model, small_checkpoint, tmp_path, monkeypatch, existing):
    tok, model = small_model
    target = tmp_path / "out"
    if existing:
        shutil.copytree(small_checkpoint, target)
    before = tree(tmp_path)

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tok, target)
    assert tree(tmp_path) == before  # old checkpoint untouched, no temp dir


def test_failed_final_rename_keeps_old_checkpoint(small_model, small_checkpoint, tmp_path, monkeypatch):
    tok, model = small_model
    target = shutil.copytree(small_checkpoint, tmp_path / "out")
    (target / "marker.txt").write_text("old")
    before = tree(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src) and not str(src).endswith("-old") and str(dst) == str(target):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained(model, tok, target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "marker.txt").read_text() == "old"
    assert set(tree(tmp_path)) == set(before)
    _, loaded, _, _ = load_pretrained_model(target)
    assert_same_weights(model, loaded)


def test_save_refuses_to_overwrite_a_file(small_model, tmp_path):
    tok, model = small_model
    target = tmp_path / "out"
    target.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_pretrained(model, tok, target)
    assert target.read_text() == "not a checkpoint" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]



# ---------------------------------------------------------------------------------------------
# streaming load onto a meta-device model
# ---------------------------------------------------------------------------------------------
def test_model_is_built_on_meta_and_fully_materialised(small_model, ckpt, monkeypatch):
    built = []
    real = builder.build_empty_model

    def spy(config):
        model = real(config)
        built.append([t.device.type for t in (*model.parameters(), *model.buffers())])
        return model

    monkeypatch.setattr(builder, "build_empty_model", spy)
    _, model2, _, _ = load_pretrained_model(ckpt)
    assert len(built) == 1 and set(built[0]) == {"meta"}  # building allocated nothing
    tensors = dict(model2.named_parameters()) | dict(model2.named_buffers())
    assert all(t.device.type == "cpu" for t in tensors.values()), [n for n, t in tensors.items() if t.is_meta]
    assert_same_weights(small_model[1], model2)
    # the buffers the checkpoint does not store are re-created, equal to a normally built model's
    for name, buf in small_model[1].named_buffers():
        assert torch.equal(tensors[name], buf), name
    assert all(p.requires_grad for p in model2.parameters())


def test_bf16_checkpoint_loads_as_fp32(small_model, ckpt):
    edit_weights(ckpt, lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))
    _, model2, _, _ = load_pretrained_model(ckpt)
    for k, v in small_model[1].state_dict().items():
        assert model2.state_dict()[k].dtype == torch.float32
        assert torch.equal(model2.state_dict()[k], v.bfloat16().float()), k


def test_torch_bin_checkpoint_loads_identically(small_model, ckpt):
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    _, model2, _, _ = load_pretrained_model(ckpt)
    assert_same_weights(small_model[1], model2)


def test_loaded_weights_do_not_alias_the_files(small_model, ckpt):
    _, model2, _, _ = load_pretrained_model(ckpt)
    f = ckpt / "model.safetensors"
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    with open(f, "r+b") as fh:  # overwrite the tensor data in place
        fh.seek(header)
        fh.write(b"\0" * (f.stat().st_size - header))
    assert_same_weights(small_model[1], model2)


# ---------------------------------------------------------------------------------------------
# sharded saves
# ---------------------------------------------------------------------------------------------
def _nbytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_sharded_save_writes_a_standard_index(small_model, tmp_path):
    tok, model = small_model
    target = save_pretrained(model, tok, tmp_path / "out", max_shard_size=_nbytes(model) // 4)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": _nbytes(model)}
    weight_map = index["weight_map"]
    assert set(weight_map) == set(model.state_dict())
    shards = sorted(set(weight_map.values()))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (target / "model.safetensors").exists()
    for shard in shards:
        assert sorted(load_file(str(target / shard))) == sorted(k for k, v in weight_map.items() if v == shard)
    _, loaded, _, _ = load_pretrained_model(target)
    assert_same_weights(model, loaded)


def test_one_file_when_it_fits(small_model, tmp_path):
    tok, model = small_model
    target = save_pretrained(model, tok, tmp_path / "out", max_shard_size=_nbytes(model))
    assert sorted(p.name for p in target.glob("model*")) == ["model.safetensors"]


def test_tensor_bigger_than_a_shard_gets_its_own(small_model, tmp_path):
    tok, model = small_model
    target = save_pretrained(model, tok, tmp_path / "out", max_shard_size=1)
    weight_map = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) == len(weight_map)


def test_failed_sharded_save_keeps_old_checkpoint(small_model, small_checkpoint, tmp_path, monkeypatch):
    tok, model = small_model
    target = shutil.copytree(small_checkpoint, tmp_path / "out")
    before = tree(tmp_path)
    real_save, calls = safetensors.torch.save_file, []

    def fails_on_third_shard(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError("killed mid-save")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_on_third_shard)
    with pytest.raises(OSError, match="killed mid-save"):
        save_pretrained(model, tok, target, max_shard_size=_nbytes(model) // 4)
    assert tree(tmp_path) == before
    monkeypatch.undo()
    _, loaded, _, _ = load_pretrained_model(target)
    assert_same_weights(model, loaded)


@pytest.mark.parametrize("value, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5 kb", 1500), (4096, 4096), ("123", 123),
])
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "lots", "5XB", "-1GB", "0MB", 0, -5, True, "5GB5"])
def test_bad_max_shard_size(small_model, tmp_path, value):
    tok, model = small_model
    with pytest.raises(InputError, match="max shard size"):
        save_pretrained(model, tok, tmp_path / "out", max_shard_size=value)
    assert list(tmp_path.iterdir()) == []


def test_small_model_merges_a_vision_config_override_key_by_key():
    from llava.model.builder import build_small_model

    _, model = build_small_model(config_overrides={"vision_config": {"num_hidden_layers": 3}, "d_model": 64,
                                                   "n_heads": 4, "n_kv_heads": 4})
    vision = model.config.to_dict()["vision_config"]
    assert vision["num_hidden_layers"] == 3 and vision["hidden_size"] == 64 and vision["patch_size"] == 14
    assert model.config.llada.d_model == 64


def test_small_model_tokenizer_has_every_entitygrid_answer_as_one_token():
    from llava.eval.entitygrid import ANSWER_VOCAB
    from llava.model.builder import build_small_tokenizer

    tok = build_small_tokenizer()
    assert {w: len(tok(w, add_special_tokens=False).input_ids) for w in ANSWER_VOCAB} == dict.fromkeys(ANSWER_VOCAB, 1)


def test_small_model_init_fn():
    from llava.errors import ConfigError
    from llava.model.builder import build_small_model

    dims = {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 172}
    _, normal = build_small_model(config_overrides=dims)
    _, fan_in = build_small_model(config_overrides={**dims, "init_fn": "fan_in"})
    for name in ("model.transformer.blocks.0.q_proj.weight", "model.transformer.blocks.0.ff_out.weight",
                 "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"):
        p, q = dict(normal.named_parameters())[name].detach(), dict(fan_in.named_parameters())[name].detach()
        assert float(p.std()) == pytest.approx(0.02, rel=0.05)
        assert float(q.std()) == pytest.approx(q[0].numel() ** -0.5, rel=0.05)
    assert fan_in.config.to_dict()["init_fn"] == "fan_in"  # recorded in config.json
    with pytest.raises(ConfigError, match="init_fn"):
        build_small_model(config_overrides={"init_fn": "xavier"})
