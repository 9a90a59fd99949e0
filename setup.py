"""growth-ds: grow trained GPT models (and their whole training state) into larger ones."""
from setuptools import find_packages, setup

setup(
    name="growth-ds",
    version="0.1.0",
    description="Model growth for DeepSpeed and Megatron-core GPT pretraining",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["growth_ds", "growth_ds.*"]),
    python_requires=">=3.10",
    # torch is pinned by the Makefile (the CPU build on disk); any 2.x >= 2.4 works.
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm", "safetensors", "sentencepiece", "scipy", "matplotlib",
                      "tensorboard"],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "megatron": ["megatron-core==0.16.1"],
        "hf": ["transformers"],
        "kernels": ["triton==3.9.0"],
        "dev": ["pytest", "pytest-timeout", "triton==3.9.0"],
    },
    entry_points={"console_scripts": ["growth-ds=growth_ds.cli:main"]},
)
