"""Build of megacpm: the engine, the Triton kernels (as megacpm.kernels) and the C++ data helpers."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

engine_packages = find_packages(include=["megacpm", "megacpm.*"])

ext_modules = [
    Pybind11Extension(
        "megacpm._C",
        sources=["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="megacpm",
    version="0.1.0",
    description="3D-parallel training engine for MiniCPM-family language models, with Triton kernels",
    python_requires=">=3.10",
    packages=engine_packages + ["megacpm.kernels"],
    package_dir={"megacpm.kernels": "kernels"},
    package_data={"megacpm.config": ["presets/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scipy>=1.10",  # the scaling-law fits (bounded least squares)
    ],
    extras_require={
        "dev": ["pytest>=7.4", "pytest-timeout>=2.1", "transformers>=4.40", "wandb>=0.16"],  # transformers: the
        # Llama-export test; wandb: the offline W&B run of tests/train/test_callbacks.py
        "gpu": ["flash-attn", "transformer-engine", "nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["megacpm=megacpm.cli:main"]},
)
