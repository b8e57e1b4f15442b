"""Package discovery for a repository whose root is the package: every folder with an `__init__.py`
below the root (tests and benchmarks aside) ships as `ember.<folder>`, so no list can drift."""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SUBPACKAGES = find_packages(exclude=("tests", "tests.*", "bench", "bench.*", "build", "build.*"))


class BuildPy(build_py):
    """Ship the root's modules, less this file (which sits in the root only because the root is the package)."""

    def find_package_modules(self, package, package_dir):
        return [module for module in super().find_package_modules(package, package_dir) if module[:2] != ("ember", "setup")]


setup(packages=["ember", *(f"ember.{name}" for name in SUBPACKAGES)], package_dir={"ember": "."},
      cmdclass={"build_py": BuildPy})
