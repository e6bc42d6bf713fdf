"""Packaging for the `byol-fast` distribution (packages `byol_fast` and `pipelines`)."""

from setuptools import find_packages, setup

setup(
    name="byol-fast",
    version="0.1.0",
    description="The fastest practical BYOL pretraining trainer for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["byol_fast", "byol_fast.*", "pipelines", "pipelines.*"]),
    package_data={"byol_fast": ["presets/*.toml"]},
    install_requires=[
        # The floor CI tests (.ci/run, a venv with exactly these), the lent GPU machine's versions.
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "tensorboard",
        "tqdm",
        # WebDataset tar shards (pipelines/shards/source.py): pure Python, with braceexpand and pyyaml.
        "webdataset>=1.0",
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "ffcv": ["ffcv==1.0.2"],
        # scikit-learn: reference solutions and the real images (load_digits) of the tests.
        "dev": ["pytest", "pytest-timeout", "scikit-learn"],
        # The benchmarks' plots (matplotlib) and their CPU accounting of loader processes (psutil).
        "bench": ["matplotlib", "psutil"],
        # Encoders by timm name (--arch timm/<name>: ConvNeXt, ViT, RegNet, ...; byol_fast/timm_encoders.py).
        "timm": ["timm>=1.0"],
    },
    entry_points={"console_scripts": ["byol-fast=byol_fast.cli:main"]},
)
