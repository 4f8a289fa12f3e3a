"""The package layout of the wheel (the metadata is in pyproject.toml).

The repository keeps its shipped files in the top-level ``Resources/`` folder (the Slicer
extension copies them beside the module, see RadGSReg/CMakeLists.txt). A wheel carries them
as package data: ``Resources/<sub>/<file>`` becomes ``RadGSRegLib/_resources/<sub>/<file>``,
mapped here (pyproject.toml alone cannot map a folder outside the package while still
discovering the packages). ``RadGSRegLib/resources.py`` finds them in either place.

Only what the library opens ships: the stage-1 weights, their model card and the training
configs (``Models``), and the lumbar sample CT with its labels, licence, notice and checksums
(``SampleData``). The icon and the panel's .ui file (``Icons``, ``UI``) belong to the Slicer
module, which is not in the wheel; ``SampleData/fetch_sample_data.py`` is the maintainers'
script that derived the sample (not needed where the sample ships).
"""
from setuptools import find_namespace_packages, setup

#: package data of RadGSRegLib._resources, relative to the top-level Resources folder
RESOURCE_FILES = [
    "Models/*.pt",
    "Models/*.md",
    "Models/configs/*.json",
    "SampleData/*.nii.gz",
    "SampleData/LICENSE",
    "SampleData/NOTICE",
    "SampleData/SHA256SUMS",
]

setup(
    packages=find_namespace_packages(include=["RadGSRegLib*"], exclude=["RadGSRegLib._resources*"])
    + ["RadGSRegLib._resources"],
    package_dir={"RadGSRegLib._resources": "Resources"},
    # the DiffDRR peer's environment (RadGSRegLib/bench/diffdrr_peer.py names this file in its set-up commands)
    package_data={"RadGSRegLib._resources": RESOURCE_FILES, "RadGSRegLib.bench": ["diffdrr-requirements.txt"]},
    # only the files listed above (not every file git or a MANIFEST.in would add)
    include_package_data=False,
)
