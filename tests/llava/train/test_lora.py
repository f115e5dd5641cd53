"""LoRA: target patterns from the yaml (zero matches is an error naming the pattern), the trainable count at
LaViDa-8B dims (meta device), and the adapter output: a standard PEFT folder + non-LoRA trainables that loads with
`load_pretrained_model(path, base)` and `llava.eval.run --model-path ADAPTER --model-base BASE`, changes the
output, and merges into a normal checkpoint folder."""
import json
import logging

import pytest
import torch

from llava.errors import ConfigError
from llava.eval import costmodel
from llava.model.builder import SMALL_MODEL_NAME, load_pretrained_model
from llava.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NON_LORA_WEIGHTS,
    count_trainable_at_lavida_dims,
    read_lora_config,
    resolve_targets,
)
from llava.train.train import TUNABLE_PARTS
from tests.llava.train.conftest import FAST

SIGLIP = "model.vision_tower.vision_tower.vision_model.encoder.layers"


def lora_yaml(tmp_path, *targets, extra=""):
    path = tmp_path / "lora.yaml"
    path.write_text("r: 8\nlora_alpha: 16\nlora_dropout: 0.0\ntarget_modules:\n"
                    + "".join(f"  - {t}\n" for t in targets) + extra)
    return path


@pytest.mark.parametrize("pattern", [
    f"{SIGLIP}.{{0-1}}.self_attn.{{q_proj,kk_proj}}",  # typo in one alternative
    "model.mm_projektor.0",
    "model.transformer.blocks.{0-1}.attn_out.lora",
])
def test_pattern_matching_no_module_is_an_error_naming_it(small_model, tmp_path, pattern):
    spec = read_lora_config(lora_yaml(tmp_path, "model.mm_projector.0", pattern))
    with pytest.raises(ConfigError, match="LoRA target pattern") as e:
        resolve_targets(small_model[1], spec.target_modules)
    assert repr(pattern) in str(e.value) and "matches no module" in str(e.value)


def test_non_linear_target_is_an_error(small_model, tmp_path):
    spec = read_lora_config(lora_yaml(tmp_path, f"{SIGLIP}.0.layer_norm1"))
    with pytest.raises(ConfigError, match="is a LayerNorm, LoRA needs a Linear layer"):
        resolve_targets(small_model[1], spec.target_modules)


def test_layers_past_the_end_are_skipped_but_not_a_whole_config(small_model, tmp_path, caplog):
    """The SHIRG config names SigLIP layers 0-5; the small model keeps 3, so 3-5 are skipped with a warning."""
    model = small_model[1]
    with caplog.at_level(logging.WARNING, logger="llava"):
        targets = resolve_targets(model, read_lora_config(lora_yaml(
            tmp_path, f"{SIGLIP}.{{0-3}}.self_attn.{{q_proj,k_proj,v_proj}}", f"{SIGLIP}.{{4-5}}.self_attn.q_proj",
            "model.mm_projector.{0,2}")).target_modules)
    assert len(targets) == 3 * 3 + 2
    assert "skipping 3 name(s)" in caplog.text and "the pattern matches nothing here" in caplog.text
    with pytest.raises(ConfigError, match="leave no module to adapt"):
        resolve_targets(model, read_lora_config(lora_yaml(tmp_path, f"{SIGLIP}.{{7-9}}.self_attn.q_proj"))
                        .target_modules)


def test_trainable_count_at_lavida_8b_dims_on_meta():
    """The SHIRG config at LaViDa-8B dims, counted on the meta device, equals the arithmetic of its shapes."""
    spec = read_lora_config("scripts/lora_shirg.yaml")
    got = count_trainable_at_lavida_dims(spec)
    r, vis, hid = 64, 1152, 4096
    expected = 12 * r * (vis + vis) + 4 * r * (vis + vis) + r * (vis + hid) + r * (hid + hid)
    assert got["lora"] == got["trainable"] == expected == 3_219_456
    assert 8.4e9 < got["total"] < 8.5e9
    full = count_trainable_at_lavida_dims(None, [p for ps in TUNABLE_PARTS.values() for p in ps])
    assert full["trainable"] == full["non_lora"] == full["total"]
    # the cost model's training-memory table counts the same (post_layernorm is frozen: LaViDa never uses it)
    dims = costmodel.ModelDims()
    assert costmodel.shirg_lora_params(dims) == expected
    assert costmodel.model_params(dims) == full["total"] - 2 * vis


# ---- the adapter folder --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(data8, tmp_path_factory):
    """Two adapters trained for 3 steps: SHIRG-stage LoRA only, and LoRA + the fully trained LM."""
    from llava.train.train import main

    root = tmp_path_factory.mktemp("adapters")
    common = ["--data_path", data8, *FAST, "--max_steps", "3", "--per_device_train_batch_size", "2",
              "--learning_rate", "2e-2", "--lora_enable", "True"]
    out = {}
    for name, extra in (("lora", []), ("lora_lm", ["--mm_tunable_parts", "mm_language_model"])):
        assert main([str(a) for a in common + ["--output_dir", root / name] + extra]) == 0
        out[name] = root / name / "final"
    return out


def test_adapter_folder_is_standard_peft(adapters):
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = adapters["lora"]
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 64 and cfg["lora_alpha"] == 128
    assert len(cfg["target_modules"]) == 11 and cfg["target_modules"] == sorted(cfg["target_modules"])
    assert all(k.startswith("base_model.model.") for k in load_file(folder / ADAPTER_WEIGHTS))
    assert load_file(folder / NON_LORA_WEIGHTS) == {}
    assert not list(folder.parent.glob("final.tmp-*"))  # written atomically
    # peft's own reader merges to the same weights as ours
    _, ours, _, _ = load_pretrained_model(folder, SMALL_MODEL_NAME)
    _, base, _, _ = load_pretrained_model(SMALL_MODEL_NAME)
    theirs = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], other[k], rtol=0, atol=1e-6, msg=k)


def test_adapter_weights_get_the_configs_permissions(adapters):
    folder = adapters["lora"]
    mode = (folder / ADAPTER_CONFIG).stat().st_mode & 0o777
    for name in (ADAPTER_WEIGHTS, NON_LORA_WEIGHTS):
        assert (folder / name).stat().st_mode & 0o777 == mode, name


def test_non_lora_trainables_are_loaded(adapters):
    from safetensors.torch import load_file

    trained = load_file(adapters["lora_lm"] / NON_LORA_WEIGHTS)
    assert "model.transformer.blocks.0.q_proj.weight" in trained and "model.image_newline" not in trained
    _, model, _, _ = load_pretrained_model(adapters["lora_lm"], SMALL_MODEL_NAME)
    state = model.state_dict()
    for k, v in trained.items():
        assert torch.equal(state[k], v), k


def test_adapter_changes_the_output_when_loaded(adapters):
    _, base, _, _ = load_pretrained_model(SMALL_MODEL_NAME)
    _, tuned, _, _ = load_pretrained_model(adapters["lora"], SMALL_MODEL_NAME)
    from PIL import Image

    image = Image.open("playground/images/demo.png").convert("RGB")
    with torch.no_grad():
        a = base.encode_image(image, "shirg", question_ids=[5, 6]).tokens
        b = tuned.encode_image(image, "shirg", question_ids=[5, 6]).tokens
    assert a.shape == b.shape == (980, base.config.llada.d_model)
    assert float((a - b).abs().max()) > 1e-2
    lm = "model.transformer.blocks.0.ff_out.weight"
    assert torch.equal(base.state_dict()[lm], tuned.state_dict()[lm])  # LoRA only: the LM is untouched


def run_json(capsys, *argv):
    from llava.eval.run import main

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []
    try:
        code = main(["--prune_method", "shirg", "--json", "--gen-length", "8", "--block-length", "8", *map(str, argv)])
    finally:
        root.handlers[:] = saved
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_run_cli_with_model_base(adapters, capsys):
    base = run_json(capsys, "--model-path", SMALL_MODEL_NAME)
    tuned = run_json(capsys, "--model-path", adapters["lora"], "--model-base", SMALL_MODEL_NAME)
    assert tuned["visual_tokens"] == base["visual_tokens"] == 980
    assert tuned["answer"] != base["answer"]


def test_merge_exports_a_normal_checkpoint(adapters, tmp_path, capsys):
    from llava.train.merge_lora import main

    merged = tmp_path / "merged"
    assert main(["--model-path", str(adapters["lora_lm"]), "--model-base", SMALL_MODEL_NAME, "--out", str(merged)]) == 0
    assert "merged" in capsys.readouterr().out
    names = {p.name for p in merged.iterdir()}
    assert "config.json" in names and "model.safetensors" in names
    assert not names & {ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA_WEIGHTS}
    _, a, _, _ = load_pretrained_model(merged)  # no base, no peft
    _, b, _, _ = load_pretrained_model(adapters["lora_lm"], SMALL_MODEL_NAME)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    tuned = run_json(capsys, "--model-path", merged)
    assert tuned["answer"] == run_json(capsys, "--model-path", adapters["lora_lm"],
                                       "--model-base", SMALL_MODEL_NAME)["answer"]
