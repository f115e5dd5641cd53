"""Install with `make install` (it pins the CPU torch wheel first; see README)."""
from setuptools import find_packages, setup

setup(
    name="shirg-lavida",
    version="0.1.0",
    description="LaViDa (diffusion VLM) re-implementation with SHIRG static visual-token selection",
    python_requires=">=3.10",
    packages=find_packages(include=["llava", "llava.*", "shirg_patches", "shirg_patches.*"]),
    # torch is pinned by `make install` (torch==2.13.0, local CPU wheel) before this runs;
    # the range below is satisfied by it, so pip installs no other torch build.
    install_requires=[
        "torch>=2.4,<2.15",
        "transformers>=4.50,<6",
        "safetensors>=0.4,<1",
        "tokenizers>=0.20,<1",
        "pillow>=10,<14",
        "numpy>=1.26,<3",
        "tqdm>=4.60,<5",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # imported only by llava/train/: LoRA, ZeRO, the yaml data list, QLoRA (bitsandbytes runs on CPU too)
        "train": ["peft>=0.13,<1", "deepspeed>=0.15,<1", "pyyaml>=6,<7", "bitsandbytes>=0.45,<1"],
        "gpu": ["flash-attn>=2.6,<3"],
        "dev": ["pytest>=8,<10", "ruff>=0.6,<1", "hypothesis>=6.100,<7"],
        # parquet exports of the evaluation sets (lmms-eval's ChartQA/DocVQA/VQAv2); JSON needs nothing extra
        "eval": ["pyarrow>=14,<30"],
    },
    # lmms-eval (installed separately, see README "Evaluation") finds `--model shirg_lavida` here
    entry_points={"lmms_eval.models": ["shirg_lavida = llava.eval.lmms_model:manifest"]},
)
