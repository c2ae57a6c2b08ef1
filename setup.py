from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="diffpo-jax",
    version="0.1.0",
    description="DiffPO (Diffusion-styled Preference Optimization) in JAX/Flax: training, Jacobi refinement, HF export",
    python_requires=">=3.11",
    packages=find_packages(include=["diffpo_jax", "diffpo_jax.*"]),
    package_data={"diffpo_jax": ["refiner/*.json", "refiner/*.safetensors", "refiner/*.md"]},  # the embedded refiner
    install_requires=requirements,
    extras_require={"verify": ["torch==2.13.0", "accelerate"]},
)
