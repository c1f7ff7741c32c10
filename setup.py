"""Package metadata for `hrda`, read from settings.ini (the nbdev 2 configuration)."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

here = Path(__file__).parent
config = ConfigParser(delimiters=["="])
config.read(here / "settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": "Apache-2.0"}  # SPDX expressions
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
license_name = licenses[cfg["license"]]
min_python = cfg["min_python"]
python_versions = [f"3.{minor}" for minor in range(int(min_python.split(".")[1]), 14)]

readme = here / "README.md"
setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license=license_name,
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    classifiers=[
        f"Development Status :: {statuses[int(cfg['status']) - 1]}",
        f"Intended Audience :: {cfg['audience'].title()}",
        f"Natural Language :: {cfg['language'].title()}",
    ] + [f"Programming Language :: Python :: {v}" for v in python_versions],
    packages=setuptools.find_packages(include=[cfg["lib_path"], f"{cfg['lib_path']}.*"]),
    include_package_data=True,
    python_requires=f">={min_python}",
    install_requires=cfg.get("requirements", "").split(),
    extras_require={"dev": cfg.get("dev_requirements", "").split()},
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
