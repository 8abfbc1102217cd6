"""Installable Score-SDE toolkit: `pip install -e ".[test]"`."""
from setuptools import find_packages, setup

setup(
    name="score-sde-toolkit",
    version="0.1.0",
    description="VP/sub-VP/VE SDEs, one noise-prediction U-Net, interchangeable samplers, bits/dim and FID.",
    python_requires=">=3.10",
    packages=find_packages(include=["sde", "sde.*", "evaluation", "evaluation.*", "configs"]),
    package_data={"sde": ["assets/mnist/*.gz", "testing/schedules/*.json"], "evaluation": ["assets/*"]},
    install_requires=[
        # torch is pinned by the installer (README / .ci/run install torch==2.13.0 CPU first);
        # this range is satisfied by that build, so pip does not pull another one.
        "torch>=2.4",
        "torchdiffeq>=0.2.3",
        "numpy>=1.24",
        "scipy>=1.10",
        "ml-collections>=0.1.1",
        "absl-py>=1.4",
        "tensorboard>=2.12",
        "tqdm>=4.60",
        "pillow>=9.0",
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={"test": ["pytest>=7.4"]},
)
