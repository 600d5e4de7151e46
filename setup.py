"""Packaging beyond pyproject.toml: conf/ and sweeps/ stay at the top of the repository (where
users read and edit them) and ship inside the package as titan/conf and titan/sweeps, so a
wheel, `pip install .` or `pip install git+URL` finds them (titan/config/paths.py)."""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["titan", "titan.*", "hydra_plugins", "hydra_plugins.*"]) + ["titan.conf", "titan.sweeps"],
    package_dir={"titan.conf": "conf", "titan.sweeps": "sweeps"},
    package_data={"titan.conf": ["*.yaml", "**/*.yaml"], "titan.sweeps": ["*.yaml"]},
)
