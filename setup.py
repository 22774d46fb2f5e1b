"""Maps the top-level folders onto the one import root ``prunelab`` (metadata lives in pyproject.toml).

``common/`` -> ``prunelab.common``, ``kernels/`` -> ``prunelab.kernels``, ``methods/`` ->
``prunelab.methods``, ``reproductions/`` -> ``prunelab.reproductions``. No top-level ``common`` or
``kernels`` module is installed (transformers probes for a package called ``kernels``).
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("common", "kernels", "methods", "reproductions")

packages = ["prunelab"]
package_dir = {"prunelab": "prunelab"}
for folder in SUBPACKAGES:
    packages.append(f"prunelab.{folder}")
    package_dir[f"prunelab.{folder}"] = folder
    packages += [f"prunelab.{folder}.{p}" for p in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
