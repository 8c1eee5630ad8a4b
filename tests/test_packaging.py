"""The install maps every package: each folder with an __init__.py under gla_jax/ and kernels/ is listed."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _packages_on_disk():
    found = set()
    for top, name in (("gla_jax", "gla_jax"), ("kernels", "gla_jax.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert config["package-dir"]["gla_jax.kernels"] == "kernels"


def test_kernels_import_as_subpackage():
    import gla_jax.kernels

    assert pathlib.Path(gla_jax.kernels.__file__).parent == ROOT / "kernels"
