"""Package layout of the wheel; everything else is in pyproject.toml.

Two checkout folders install under other names, so the list of packages is computed here rather than
written out (a new subpackage of either tree ships without anyone editing a list):

- `training/` (and its subpackages) → `radiogenomicgan_training`: a wheel never claims the generic top-level
  name `training`. Its modules import each other relatively; `python -m training.*` from a checkout is
  unchanged.
- `Resources/` → `RadiogenomicGANLib.bundled_model`, holding only the demo model files (package data in
  pyproject.toml): whatever `make demo-weights` left there at build time ships, found by `bundled.py`.
"""

from setuptools import find_packages, setup

TRAINING = "radiogenomicgan_training"
BUNDLED = "RadiogenomicGANLib.bundled_model"

setup(
    packages=[
        *find_packages(include=["RadiogenomicGANLib", "RadiogenomicGANLib.*"]),
        BUNDLED,
        *(TRAINING + name[len("training"):] for name in find_packages(include=["training", "training.*"])),
    ],
    package_dir={BUNDLED: "Resources", TRAINING: "training"},
)
