"""Package layout (the rest of the metadata is in pyproject.toml): the top-level templates/ folder is installed as the
package ``releaser.templates``, so a wheel install has the card and chat templates (releaser/resources.py)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["releaser", "releaser.*"]), "releaser.templates"],
      package_dir={"releaser.templates": "templates"})
