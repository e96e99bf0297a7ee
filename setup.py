from setuptools import find_packages, setup

setup(
    name="fusedloss",
    version="0.1.0",
    description="Training losses for sequence RL, imitation learning and policy distillation, "
    "with fused Triton kernels and PyTorch references.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    author="The fusedloss authors",
    keywords=["pytorch", "triton", "reinforcement-learning", "distillation", "loss", "dqn"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["fusedloss", "fusedloss.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "sinkhorn": ["geomloss>=0.3.1", "pykeops>=2.3"],
        "test": ["pytest>=8", "hypothesis>=6", "pyyaml", "pytest-benchmark>=5", "tensordict>=0.10", "pot>=0.9.5",
                 "triton>=3.6", "geomloss>=0.3.1", "pykeops>=2.3", "build>=1.0"],
        "bench": ["pytest-benchmark>=5", "matplotlib>=3.8", "pot>=0.9.5", "triton>=3.6", "geomloss>=0.3.1",
                  "pykeops>=2.3"],
        "examples": ["gymnasium>=1.0", "tqdm>=4.60", "matplotlib>=3.8", "pyyaml"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
)
