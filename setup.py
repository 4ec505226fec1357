from setuptools import find_packages, setup

setup(
    name="regate-megatron",
    version="0.1.0",
    description="ReGATE (Reference-Guided Adaptive Token Elision) for Megatron-Core MLLM training",
    packages=find_packages(include=["regate_megatron", "regate_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        # 0.16.1 (Python >= 3.10) to 0.19.x (0.17+ need Python 3.12); CI tests 0.16.1 on CPU,
        # benchmarks/gpu_check.sh 0.16.1 and the newest 0.19.x on a GPU. API differences:
        # regate_megatron/core/mcore_compat.py.
        "megatron-core>=0.16.1,<0.20",
        "packaging",
        "numpy",
        "sentencepiece",
        # dist_checkpointing needs psutil but megatron-core does not declare it.
        "psutil",
        # data: images (PNG/JPEG), the embedded digits demo, plots, progress, TensorBoard.
        "Pillow",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "tensorboard",
    ],
    entry_points={
        "console_scripts": [
            "regate-train=regate_megatron.training.train:main",
            "regate-precompute-ref=regate_megatron.tools.precompute:main",
            "regate-demo=regate_megatron.tools.demo.run:main",
            "regate-ablate=regate_megatron.tools.ablate:main",
            "regate-inspect=regate_megatron.tools.inspect_refs:main",
        ],
    },
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "megatron-energon>=7.4"],
        # examples/multimodal's data (regate_megatron.megatron_lm.energon)
        "energon": ["megatron-energon>=7.4"],
        # NVIDIA Apex is optional and built from source on GPU clusters; it is never a
        # pip dependency (the PyPI name "apex" is an unrelated package).
        "te": ["transformer-engine[pytorch]"],
    },
)
