"""The trainer end to end on the built-in small model: loss goes down (8 samples overfit), kill-and-resume ends
with the weights of an uninterrupted run, 2 gloo processes equal 1 process with doubled accumulation, DeepSpeed
ZeRO-2 on CPU equals the torch engine (also with the LM in 4 bits), QLoRA 4-bit trains, and bad input gets one
clear line."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from llava.model.builder import SMALL_MODEL_NAME, load_pretrained_model
from llava.utils import free_port
from tests.llava.train.conftest import (
    PLAYGROUND,
    REPO,
    assert_same_weights,
    common,
    final_weights,
    one_error_line,
    subprocess_env,
)


def log_steps(out):
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


# ---- learning --------------------------------------------------------------------------------------------------
def fixed_loss(path, data):
    """The objective on all 8 samples with fixed masks and no token dropout (eval mode)."""
    from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from llava.train.objective import diffusion_loss
    from shirg_patches import get_method

    tokenizer, model, _, _ = load_pretrained_model(path)
    dataset = LazySupervisedDataset(data, tokenizer, seed=0)
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, 4096, seed=0)([dataset[i] for i in range(8)])
    with torch.no_grad():
        loss, _ = diffusion_loss(model.eval(), batch, "stride", get_method("stride").make_options({"budget": 32}),
                                 generator=torch.Generator().manual_seed(1))
    return float(loss)


def test_overfits_eight_samples(data8, tmp_path, train_main):
    """Projector + LM trained (the vision tower's backward would triple the time); 6 full-batch steps."""
    out = tmp_path / "run"
    code, err = train_main(*common(data8, out, "--per_device_train_batch_size", "8", "--max_steps", "6",
                                   "--learning_rate", "1e-2", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model"))
    assert code == 0, err
    before, after = fixed_loss(SMALL_MODEL_NAME, data8), fixed_loss(out / "final", data8)
    assert after < 0.2 * before, (before, after)
    logged = [e["loss"] for e in log_steps(out)]
    assert len(logged) == 6 and logged[-1] < logged[0]


# ---- resume ----------------------------------------------------------------------------------------------------
def test_killed_run_resumes_to_the_same_weights(data8, tmp_path, train_main):
    args = ["--max_steps", "5", "--save_steps", "2", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model"]
    code, err = train_main(*common(data8, tmp_path / "straight", *args))
    assert code == 0, err

    out = tmp_path / "killed"
    env = subprocess_env(OMP_NUM_THREADS=str(torch.get_num_threads()))  # same kernels as this process
    proc = subprocess.Popen([sys.executable, "-m", "llava.train.train", *map(str, common(data8, out, *args))],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-2").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()

    code, err = train_main(*common(data8, out, *args, "--resume_from_checkpoint", "latest"))
    assert code == 0, err
    assert "resumed from" in err
    steps = [e["step"] for e in log_steps(out)]
    assert steps == [1, 2, 3, 4, 5]  # the killed run's logged steps past its checkpoint were dropped
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(out))
    assert_same_weights(final_weights(tmp_path / "straight", "checkpoint-4"), final_weights(out, "checkpoint-4"))


def test_lora_resume_restores_adapter_and_optimizer(data8, tmp_path, train_main):
    """A LoRA run restarted from its step-2 checkpoint (copied alone into a fresh folder) ends like the original."""
    args = ["--max_steps", "3", "--save_steps", "2", "--lora_enable", "True", "--learning_rate", "1e-2"]
    code, err = train_main(*common(data8, tmp_path / "straight", *args))
    assert code == 0, err
    out = tmp_path / "restarted"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", out / "checkpoint-2")
    code, err = train_main(*common(data8, out, *args, "--resume_from_checkpoint", "latest"))
    assert code == 0, err
    assert "at step 2 of 3" in err
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(out))


# ---- scale-out -------------------------------------------------------------------------------------------------
def test_two_processes_equal_one_with_doubled_accumulation(data8, tmp_path, train_main):
    """torchrun, 2 CPU processes on gloo (DDP), micro-batch 1: the same global batch of 2 per step as one process
    with accumulation 2, the same data order and draws, so the same weights (fp32 tolerance)."""
    args = ["--max_steps", "2", "--per_device_train_batch_size", "1"]
    out2 = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "llava.train.train", *map(str, common(data8, out2, *args))],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"world_size": 2' in proc.stderr
    code, err = train_main(*common(data8, tmp_path / "one", *args, "--gradient_accumulation_steps", "2"))
    assert code == 0, err
    assert [e["loss"] for e in log_steps(out2)] == pytest.approx([e["loss"] for e in log_steps(tmp_path / "one")],
                                                                  abs=1e-5)
    # gloo's all-reduce sums in another order than accumulation; Adam divides by sqrt(v), so on parameters whose
    # gradient is near zero those last-bit differences grow towards the lr (1e-3) scale
    assert_same_weights(final_weights(out2), final_weights(tmp_path / "one"), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["16", "4"])
def test_deepspeed_zero2_on_cpu_equals_the_torch_engine(data8, tmp_path, train_main, bits):
    """DeepSpeed ZeRO-2 (one CPU process; its first init on a machine JIT-builds a small comm op) for 2 LoRA
    steps, with the LM in full precision and in bitsandbytes NF4 (QLoRA: ZeRO-2 shards only the trainable
    state, the packed weights stay whole): the adapter equals the torch engine's within fp32 tolerance, and the
    checkpoint holds DeepSpeed's state."""
    args = ["--max_steps", "2", "--lora_enable", "True", "--save_steps", "2", "--bits", bits]
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-m", "llava.train.train", "--deepspeed", REPO / "scripts" / "zero2.json",
                           *map(str, common(data8, out, *args))],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine deepspeed" in proc.stderr
    assert ("quantised LM linear layers: 28" in proc.stderr) == (bits == "4")
    assert (out / "checkpoint-2" / "deepspeed").is_dir()
    code, err = train_main(*common(data8, tmp_path / "torch", *args))
    assert code == 0, err
    # DeepSpeed flattens and buckets the gradients, so fp32 sums run in another order (seen: 1.1e-5 apart)
    assert_same_weights(final_weights(out), final_weights(tmp_path / "torch"), atol=1e-4)


def test_qlora_4bit_on_the_small_model(data8, tmp_path, train_main):
    out = tmp_path / "q4"
    code, err = train_main(*common(data8, out, "--max_steps", "2", "--lora_enable", "True", "--bits", "4"))
    assert code == 0, err
    assert "quantised LM linear layers: 28" in err  # 4 blocks x (q, k, v, attn_out, ff_proj, up_proj, ff_out)
    weights = final_weights(out)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(lora_b) == 11 and all(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero
    _, model, _, _ = load_pretrained_model(out / "final", SMALL_MODEL_NAME)  # applies to the unquantised base
    assert type(model.model.transformer.blocks[0].q_proj) is torch.nn.Linear


# ---- bad input -------------------------------------------------------------------------------------------------
def records(n=4):
    return json.loads((PLAYGROUND / "train.json").read_text())[:n]


def write_json(tmp_path, recs, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(recs))
    return path


def test_missing_images_are_counted_and_skipped_or_fatal_with_strict(tmp_path, train_main):
    recs = records(4) + [dict(records(1)[0], image="images/nope-1.png"), dict(records(1)[0], image="images/nope-2.png")]
    data = write_json(tmp_path, recs)
    base = common(data, tmp_path / "run", "--image_folder", PLAYGROUND, "--max_steps", "1")
    code, err = train_main(*base)
    assert code == 0, err
    assert "skipping 2 of 6 records whose image file is missing" in err and "4 samples" in err
    code, err = train_main(*base, "--strict_data", "True", "--overwrite_output_dir", "True")
    assert code == 2
    assert "2 image file(s) not found (--strict_data)" in one_error_line(err)


def test_unreadable_image_mid_epoch_is_skipped(tmp_path, train_main):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    recs = records(3) + [dict(records(1)[0], image=str(tmp_path / "broken.png"))]
    for r in recs[:3]:
        r["image"] = str(PLAYGROUND / r["image"])
    code, err = train_main(*common(write_json(tmp_path, recs), tmp_path / "run", "--max_steps", "2"))
    assert code == 0, err
    assert "skipping data.json record 3" in err


@pytest.mark.parametrize("break_it, message", [
    (lambda r: r[2]["conversations"][1].update({"from": "robot"}),
     "data.json record 2: field 'conversations[1].from' must be 'human' or 'gpt', got 'robot'"),
    (lambda r: r[1].pop("conversations"), "data.json record 1: field 'conversations' must be a non-empty list"),
    (lambda r: r[3].update({"image": 7}), "data.json record 3: field 'image' must be a non-empty string"),
])
def test_malformed_record_is_named(tmp_path, train_main, break_it, message):
    recs = records(4)
    break_it(recs)
    code, err = train_main(*common(write_json(tmp_path, recs), tmp_path / "run", "--image_folder", PLAYGROUND))
    assert code == 2 and message in one_error_line(err)


def test_empty_data_set(tmp_path, train_main):
    code, err = train_main(*common(write_json(tmp_path, []), tmp_path / "run"))
    assert code == 2 and "the data set is empty" in one_error_line(err)


def test_missing_deepspeed_config(data8, tmp_path, train_main):
    code, err = train_main(*common(data8, tmp_path / "run", "--deepspeed", tmp_path / "zero9.json"))
    assert code == 2 and f"--deepspeed {tmp_path / 'zero9.json'}: no such file" in one_error_line(err)
    assert not (tmp_path / "run").exists()  # checked before anything is loaded or written


def test_bits_with_zero3_is_refused_before_loading(data8, tmp_path, train_main):
    code, err = train_main(*common(data8, tmp_path / "run", "--lora_enable", "True", "--bits", "4",
                                   "--deepspeed", REPO / "scripts" / "zero3.json"))
    assert code == 2 and "--bits 4 with ZeRO stage 3" in one_error_line(err) and "zero2.json" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_truncated_resume_checkpoint_is_named(data8, tmp_path, train_main):
    out = tmp_path / "run"
    args = ["--max_steps", "1", "--save_steps", "1", "--mm_tunable_parts", "mm_mlp_adapter"]
    code, err = train_main(*common(data8, out, *args))
    assert code == 0, err
    optimizer = out / "checkpoint-1" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    code, err = train_main(*common(data8, out, *args, "--max_steps", "2", "--resume_from_checkpoint", "latest"))
    assert code == 2
    assert f"checkpoint file {optimizer} is truncated or corrupt" in one_error_line(err)


def test_resume_with_other_total_steps_is_refused(data8, tmp_path, train_main):
    out = tmp_path / "run"
    args = ["--save_steps", "1", "--mm_tunable_parts", "mm_mlp_adapter"]
    code, err = train_main(*common(data8, out, *args, "--max_steps", "1"))
    assert code == 0, err
    code, err = train_main(*common(data8, out, *args, "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    assert code == 2 and "total_steps=1 but this run has total_steps=3" in one_error_line(err)


def test_bits_without_bitsandbytes(data8, tmp_path, train_main, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    code, err = train_main(*common(data8, tmp_path / "run", "--lora_enable", "True", "--bits", "4"))
    assert code == 2 and "--bits 4/8 needs the bitsandbytes package" in one_error_line(err)
