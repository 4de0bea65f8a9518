"""The registry: every module of ``report/families/`` found, its families in declared order."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import dynlens.report.families
from dynlens.report.registry import FAMILIES, discover


def test_the_table_order_is_the_declared_one():
    assert list(FAMILIES) == [
        "grokking",
        "collapse",
        "hessian",
        "hessian_blocks",
        "hessian_spectrum",
        "optimizer",
        "logits",
        "continual",
        "warning",
    ]
    orders = [f.order for f in FAMILIES.values()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_every_module_of_the_families_package_is_found():
    directory = Path(dynlens.report.families.__file__).parent
    modules = {f"dynlens.report.families.{p.stem}" for p in directory.glob("*.py")}
    modules.discard("dynlens.report.families.__init__")
    assert {f.summarise.__module__ for f in FAMILIES.values()} == modules


def package(root: Path, name: str, modules: dict[str, str]) -> str:
    """A package ``name`` under ``root`` (on ``sys.path``) with one module per entry."""
    header = "from dynlens.report.family import family\n\n"
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / name / f"{module}.py").write_text(header + source)
    return name


def declare(name: str, order: int) -> str:
    return textwrap.dedent(f"""
        @family({name!r}, order={order}, title={name!r}, fields=("x",), columns=())
        def {name}(ctx):
            return None
        """)


def test_a_module_added_to_a_package_is_found_at_its_declared_place(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    name = package(
        tmp_path,
        f"families_{tmp_path.name}",
        {
            "a_late": declare("late", 30),
            "b_early": declare("early", 10),
            # a family imported from a sibling is the same one, counted once
            "c_between": declare("between", 20) + "\nfrom .a_late import late\n",
        },
    )
    found = discover(name)
    assert list(found) == ["early", "between", "late"]
    assert [f.order for f in found.values()] == [10, 20, 30]
    assert found["late"].summarise.__module__ == f"{name}.a_late"


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ({"a": declare("one", 10), "b": declare("two", 10)}, r"'one' and 'two' both .* order=10"),
        ({"a": declare("one", 10), "b": declare("one", 20)}, r"two families are named 'one'"),
    ],
)
def test_a_shared_place_or_name_is_refused(tmp_path, monkeypatch, modules, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        discover(package(tmp_path, f"families_{tmp_path.name}", modules))
