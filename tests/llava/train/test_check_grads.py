"""`python -m llava.train.check_grads`: exactly the intended parameters receive gradients (LoRA/SHIRG and full
LaViDa-style configurations), and an unintended one makes the check fail."""
import llava.train.train as train_module
from llava.train.check_grads import check, main


def test_lora_shirg_configuration_passes(capsys):
    assert main(["--prune_method", "shirg", "--lora_enable", "True"]) == 0
    out = capsys.readouterr().out
    assert "OK: exactly the intended 22 tensor(s)" in out  # 11 LoRA targets x (A, B) on the small model
    assert "mm_projector.0.lora_A.default.weight" in out and "lora_B" in out


def test_full_configuration_passes():
    code, report = check(["--prune_method", "pool"])
    assert code == 0, report
    assert "model.image_newline" in report  # pool uses LaViDa's spatial_unpad merge, so the newline is trained
    assert "post_layernorm" in report.split("frozen on purpose")[1]  # LaViDa reads features before it


def test_full_configuration_with_shirg_freezes_image_newline():
    code, report = check(["--prune_method", "shirg", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model"])
    assert code == 0, report
    assert "model.image_newline" in report.split("frozen on purpose")[1]


def test_unintended_gradient_fails(monkeypatch):
    real = train_module.load_model_for_training
    leaked = "model.transformer.blocks.0.ff_out.weight"

    def leaky(*args, **kwargs):  # a frozen LM weight left trainable by mistake
        setup = real(*args, **kwargs)
        dict(setup.model.named_parameters())[leaked].requires_grad_(True)
        return setup

    monkeypatch.setattr(train_module, "load_model_for_training", leaky)
    code, report = check(["--prune_method", "shirg", "--lora_enable", "True"])
    assert code == 1
    assert "FAIL: 1 tensor(s) outside the intended set received a gradient" in report
    assert "model.transformer.blocks.{0}.ff_out.weight" in report


def test_intended_parameter_without_gradient_fails(monkeypatch):
    real = train_module.load_model_for_training

    def cut(*args, **kwargs):  # one SigLIP projection's output detached: its LoRA factors never see the loss
        setup = real(*args, **kwargs)
        modules = dict(setup.model.named_modules())
        v_proj = modules["model.vision_tower.vision_tower.vision_model.encoder.layers.2.self_attn.v_proj"]
        v_proj.register_forward_hook(lambda module, inputs, output: output.detach())
        return setup

    monkeypatch.setattr(train_module, "load_model_for_training", cut)
    code, report = check(["--prune_method", "shirg", "--lora_enable", "True"])
    assert code == 1
    assert "FAIL: 2 intended tensor(s) received no gradient" in report
    assert "layers.{2}.self_attn.v_proj.lora_A.default.weight" in report
