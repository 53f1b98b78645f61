"""Revision comparison (tools/bench_trees.py): each round really runs the tree it names.

Two fake checkouts whose `tierd_client` differ by one constant stand in for two revisions:
a benchmark script that reports that constant must see each tree's own value, which it
would not if the venv's editable install (this checkout) won over the tree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
_spec = importlib.util.spec_from_file_location("bench_trees", TOOLS / "bench_trees.py")
assert _spec is not None and _spec.loader is not None
bench_trees = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_trees)

BENCH = f"""
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, {str(TOOLS)!r})
import bench_trees
import tierd_client
p = argparse.ArgumentParser()
p.add_argument("--scale", type=float, default=1.0)
p.add_argument("--dir", type=Path)
p.add_argument("--json", type=Path)
args = p.parse_args()
doc = {{"value": tierd_client.VALUE * args.scale, "dir": str(args.dir)}}
bench_trees.stamp(doc)
args.json.write_text(json.dumps(doc))
"""


def fake_tree(root: Path, value: float, *, kernels: bool = True) -> Path:
    for pkg in ("tierd", "client", *(["kernels"] if kernels else [])):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "client" / "__init__.py").write_text(f"VALUE = {value}\n")
    return root


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float)
    p.add_argument("--json", type=Path)
    bench_trees.add_arguments(p)
    return p.parse_args(argv)


def test_rounds_alternate_trees_and_each_imports_its_own_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = fake_tree(tmp_path / "a", 1.0), fake_tree(tmp_path / "b", 2.0)
    script = tmp_path / "bench.py"
    script.write_text(BENCH)
    out = tmp_path / "cmp.json"
    argv = ["--trees", f"{a},{b}", "--rounds", "2", "--scale", "3", "--json", str(out)]
    monkeypatch.chdir(tmp_path)

    rc = bench_trees.compare(script, parse(argv), lambda d: {"value": d["value"]}, argv=argv)

    assert rc == 0
    doc = json.loads(out.read_text())
    assert [(r["tree"], r["round"]) for r in doc["rounds"]] == [
        ("A", 1), ("B", 1), ("A", 2), ("B", 2)
    ]  # fmt: skip
    assert [r["metrics"]["value"] for r in doc["rounds"]] == [3.0, 6.0, 3.0, 6.0]
    assert [r["imports"]["tierd_client"] for r in doc["rounds"]][:2] == [
        str(a.resolve() / "client" / "__init__.py"),
        str(b.resolve() / "client" / "__init__.py"),
    ]
    value = doc["summary"]["value"]
    assert value["B/A"] == pytest.approx(2.0)
    assert value["B/A range"] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert value["A"]["spread"] == 0.0
    printed = capsys.readouterr().out
    assert f"tierd_client.__file__ = {b.resolve() / 'client' / '__init__.py'}" in printed


def test_a_tree_given_twice_compares_with_itself_and_leaves_no_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = fake_tree(tmp_path / "a", 1.0)
    script = tmp_path / "bench.py"
    script.write_text(BENCH)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(bench_trees.tempfile, "tempdir", str(temp))
    out = tmp_path / "cmp.json"
    argv = ["--trees", f"{a},{a}", "--rounds", "1", "--json", str(out)]

    assert bench_trees.compare(script, parse(argv), lambda d: {"v": d["value"]}, argv=argv) == 0

    assert json.loads(out.read_text())["summary"]["v"]["B/A"] == 1.0
    assert list(temp.iterdir()) == []


def test_every_round_works_in_the_callers_dir_unless_the_bench_is_told(tmp_path: Path) -> None:
    own = bench_trees._child_argv(
        ["--tree", "x", "--scale=2", "--rounds=4", "--json", "f"], tmp_path
    )
    assert own == ["--scale=2", "--dir", str(tmp_path)]
    assert bench_trees._child_argv(["--dir", "/d", "--trees", "a,b"], tmp_path) == ["--dir", "/d"]


def test_a_tree_that_cannot_supply_its_packages_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without kernels/ in the tree, tierd_kernels comes from elsewhere on the path.
    elsewhere = tmp_path / "elsewhere" / "tierd_kernels"
    elsewhere.mkdir(parents=True)
    (elsewhere / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(elsewhere.parent))
    a = fake_tree(tmp_path / "a", 1.0, kernels=False)
    argv = ["--tree", str(a), "--rounds", "1"]
    with pytest.raises(SystemExit, match="did not import the code of"):
        bench_trees.compare(tmp_path / "unused.py", parse(argv), dict, argv=argv)
