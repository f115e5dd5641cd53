"""Damaged checkpoint folders: `BAD_FOLDERS` maps a case to (damage(folder), error type, message regex).

Each `damage` edits a writable copy of a folder written by `save_pretrained` (the `small_checkpoint` fixture).
Used by tests/llava/model/test_builder.py (the loader raises the error) and tests/llava/test_bad_inputs.py (the
CLI turns it into one `error:` line).
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from llava.errors import CheckpointError, ConfigError


def tree(root):
    """Every path under root with its size and mtime: a snapshot to prove nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


class _RunsAShellCommand:
    """Unpickling this would call os.system: what a malicious `.bin` holds."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garble_header(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(b"\0" * 16 + data[16:])


def _missing_shard(path):
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:5]}, str(path / "model-00001-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" if i < 5 else "model-00002-of-00002.safetensors"
                  for i, k in enumerate(keys)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "model.safetensors").unlink()


def two_shards(path):
    """Re-save the checkpoint as two shards with an index (the loader's sharded layout)."""
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, parts):
        save_file({k: state[k] for k in part}, str(path / name))
    weight_map = {k: name for name, part in zip(names, parts) for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "model.safetensors").unlink()


def _truncated_shard(path):
    two_shards(path)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _wrong_shape(state):
    state["model.mm_projector.2.bias"] = torch.zeros(state["model.mm_projector.2.bias"].shape[0] + 1)


def _edit_index(fn):
    def damage(path):
        two_shards(path)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        fn(index, path)
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return damage


def _shard_moved_outside(index, path):
    """The first shard moved next to the folder and the index pointing at it with `../`."""
    (path.parent / "other").mkdir()
    shutil.move(path / "model-00001-of-00002.safetensors", path.parent / "other")
    index["weight_map"] = {k: ("../other/" + v if v.startswith("model-00001") else v)
                           for k, v in index["weight_map"].items()}


def _shard_absolute(index, path):
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = str(path / index["weight_map"][first])


def _torch_bin(obj):
    def damage(path):
        state = load_file(str(path / "model.safetensors"))
        torch.save(obj(state), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return damage


def _set(key, value):
    return lambda p: edit_config(p, lambda c: c.update({key: value}))


BAD_FOLDERS = {
    "no_config": (lambda p: (p / "config.json").unlink(), CheckpointError, r"no config\.json"),
    "invalid_json": (lambda p: (p / "config.json").write_text("{\"d_model\": 128,"), ConfigError, "not valid JSON"),
    "missing_n_heads": (lambda p: edit_config(p, lambda c: c.pop("n_heads")), ConfigError, "n_heads"),
    "no_weights": (lambda p: (p / "model.safetensors").unlink(), CheckpointError, "has no weights"),
    "missing_shard": (_missing_shard, CheckpointError, r"missing: model-00002-of-00002\.safetensors"),
    "truncated_weights": (_truncate, CheckpointError, r"cannot read .*model\.safetensors"),
    "corrupt_header": (_garble_header, CheckpointError, r"cannot read .*model\.safetensors"),
    "truncated_shard": (_truncated_shard, CheckpointError, r"cannot read .*model-00002-of-00002\.safetensors"),
    "missing_tensor": (lambda p: edit_weights(p, lambda s: s.pop("model.image_newline")),
                       CheckpointError, r"lacks 1 weight\(s\): model\.image_newline"),
    "wrong_shape": (lambda p: edit_weights(p, _wrong_shape), CheckpointError,
                    r"wrong shape, e\.g\. model\.mm_projector\.2\.bias is \(129,\), model expects \(128,\)"),
    "no_tokenizer": (lambda p: (p / "tokenizer.json").unlink(), CheckpointError, "no tokenizer"),
    "config_is_a_list": (lambda p: (p / "config.json").write_text("[1, 2]"), ConfigError,
                         r"config\.json must hold a JSON object \(key: value\), not a list"),
    "config_not_utf8": (lambda p: (p / "config.json").write_bytes(b'{"d_model": "\xff"}'), ConfigError,
                        r"config\.json is not UTF-8 text"),
    "weight_map_is_a_list": (_edit_index(lambda i, p: i.update(weight_map=list(i["weight_map"].values()))),
                             CheckpointError, "'weight_map' must be a non-empty object"),
    "shard_name_not_a_string": (_edit_index(lambda i, p: i["weight_map"].update({"model.image_newline": 5})),
                                CheckpointError, "shard of 'model.image_newline' must be a file name, got 5"),
    "shard_outside_folder": (_edit_index(_shard_moved_outside), CheckpointError,
                             r"points outside the checkpoint folder: '\.\./other/model-00001-of-00002"),
    "shard_absolute_path": (_edit_index(_shard_absolute), CheckpointError, "points outside the checkpoint folder"),
    "bin_bare_tensor": (_torch_bin(lambda s: torch.zeros(3)), CheckpointError,
                        r"pytorch_model\.bin holds a Tensor, not a dict"),
    "bin_non_tensor_value": (_torch_bin(lambda s: {**s, "model.image_newline": 3}), CheckpointError,
                             r"entry 'model\.image_newline' is not a tensor \(int\)"),
    "integer_tensor": (lambda p: edit_weights(p, lambda s: s.update({"model.image_newline": torch.zeros(
        s["model.image_newline"].shape, dtype=torch.int64)})), CheckpointError,
        r"1 weight\(s\) are not floating point, e\.g\. model\.image_newline is I64"),
    "vision_config_non_numeric": (lambda p: edit_config(p, lambda c: c["vision_config"].update(hidden_size="big")),
                                  ConfigError, "vision_config.hidden_size must be a positive integer, got 'big'"),
    "vision_config_unknown_activation": (
        lambda p: edit_config(p, lambda c: c["vision_config"].update(hidden_act="wiggle")),
        ConfigError, "vision_config.hidden_act 'wiggle' is not an activation"),
    "pinpoint_one_number": (_set("image_grid_pinpoints", [[384]]), ConfigError,
                            r"'image_grid_pinpoints' must be a non-empty list of \[width, height\]"),
    "pinpoint_not_whole_tiles": (_set("image_grid_pinpoints", [[500, 384]]), ConfigError,
                                 r"\[500, 384\] is not a whole number of 384 px tiles"),
    "pinpoints_bad_string": (_set("image_grid_pinpoints", "(1x1),...,(6x6)"), ConfigError,
                             "'image_grid_pinpoints' '\\(1x1\\)"),
    "rope_theta_string": (_set("rope_theta", "abc"), ConfigError,
                          r"config\.json: config key 'rope_theta' must be a positive number, got 'abc'"),
    "max_length_zero": (_set("tokenizer_model_max_length", 0), ConfigError,
                        "'tokenizer_model_max_length' must be a positive integer, got 0"),
    "max_length_negative": (_set("tokenizer_model_max_length", -5), ConfigError, "tokenizer_model_max_length"),
    "bin_malicious_pickle": (_torch_bin(lambda s: {**s, "model.image_newline": _RunsAShellCommand()}),
                             CheckpointError, r"pytorch_model\.bin: it holds pickled Python objects besides tensors.*"
                             r"unsupported GLOBAL posix\.system"),
    "mm_hidden_size_float": (_set("mm_hidden_size", 64.5), ConfigError, "'mm_hidden_size' must be a positive integer"),
}
