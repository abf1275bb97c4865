"""The package list, found rather than listed: every package under onnx_excite/, and the
top-level cli/ and models/ folders installed inside it as onnx_excite.cli / onnx_excite.models
(a new subpackage of any of them is picked up; tests/test_wheel.py checks the built wheel).
Everything else is declared in pyproject.toml."""
from setuptools import find_packages, setup

INSTALLED_INSIDE = ("cli", "models")   # top-level folders installed as onnx_excite.<name>

packages = find_packages(include=["onnx_excite", "onnx_excite.*"])
for top in INSTALLED_INSIDE:
    packages += [f"onnx_excite.{p}" for p in find_packages(include=[top, f"{top}.*"])]

setup(packages=packages, package_dir={f"onnx_excite.{top}": top for top in INSTALLED_INSIDE})
