"""Package discovery for the one `diffroute` distribution (metadata lives in pyproject.toml).

The design card keeps pipelines/, eval/ and app/ at the top level but installs them as diffroute.pipelines,
diffroute.eval and diffroute.app; pyproject's `packages.find` cannot discover packages under remapped folders, so
they are discovered here and every subpackage lands in the wheel without a hand-kept list.
"""

from setuptools import find_packages, setup

REMAPPED = {"pipelines": "diffroute.pipelines", "eval": "diffroute.eval", "app": "diffroute.app"}

packages = find_packages(include=["diffroute", "diffroute.*"])
package_dir = {"diffroute": "diffroute"}
for folder, name in REMAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]
    package_dir[name] = folder

setup(packages=packages, package_dir=package_dir)
