"""Package discovery for the one `diffroute` distribution (metadata lives in pyproject.toml).

The design card keeps pipelines/, eval/ and app/ at the top level but installs them as diffroute.pipelines,
diffroute.eval and diffroute.app; pyproject's `packages.find` cannot discover packages under remapped folders, so
they are discovered here and every subpackage lands in the wheel without a hand-kept list.
"""

from pathlib import Path

from setuptools import find_packages, setup

REMAPPED = {"pipelines": "diffroute.pipelines", "eval": "diffroute.eval", "app": "diffroute.app"}
DATA = Path("diffroute/zoo")  # shipped data and weights live in folders below it

packages = find_packages(include=["diffroute", "diffroute.*"])
package_dir = {"diffroute": "diffroute"}
for folder, name in REMAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]
    package_dir[name] = folder

# Data folders are declared as (namespace) packages carrying all their files, as setuptools asks; a folder whose
# name is no identifier (emoji-clip) is carried by its nearest identifier-named parent instead.
package_data = {}
for folder in sorted(d for sub in ("data", "weights") for d in [DATA / sub, *(DATA / sub).rglob("*")] if d.is_dir()):
    if "__pycache__" in folder.parts:
        continue
    owner = folder
    while not all(part.isidentifier() for part in owner.parts):
        owner = owner.parent
    name = ".".join(owner.parts)
    if name not in packages:
        packages.append(name)
    package_data.setdefault(name, []).append(str(folder.relative_to(owner) / "*"))

setup(packages=packages, package_dir=package_dir, package_data=package_data)
