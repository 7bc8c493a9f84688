"""The package's parts import one way: cli -> bench, train -> codec -> model -> format -> the leaves.

Every import of a bsqcodec module, at the top of a file or inside a function, is checked against the
order in the README's "Layout of the code"; the API (__init__) and the Pillow plugin may use any part.
"""

import ast
from pathlib import Path

import bsqcodec

PKG = Path(bsqcodec.__file__).parent
LEAVES = {"errors", "config", "cpu", "metrics", "perceptual"}
TOP = {"__init__", "pillow_plugin"}
# what each part may import, besides itself and the leaves
ALLOWED = {
    "format": set(),
    "model": {"format"},
    "codec": {"format", "model"},
    "train": {"format", "model", "codec"},
    "bench": {"format", "model", "codec"},
    "cli": {"format", "model", "codec", "train", "bench"},
}


def _part(module: str) -> str:
    """'bsqcodec.model.weights' -> 'model'; 'bsqcodec.errors' -> 'leaf'; the API and the plugin -> 'top'.
    The package's __version__ counts as a leaf: every import of a bsqcodec module has run __init__ already."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in TOP:
        return "top"
    return "leaf" if parts[0] in LEAVES or parts[0] == "__version__" else parts[0]


def _imports(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module) of every bsqcodec module that `source` imports, a module of `package`
    (e.g. ["bsqcodec", "model"]). Names imported from a package (`from . import a`) count as modules."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod.split(".")[0] != "bsqcodec":
                continue
            is_package = node.module is None or (PKG.parent / mod.replace(".", "/") / "__init__.py").exists()
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names] if is_package else [(node.lineno, mod)]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("bsqcodec.")]
    return out


def _allowed(src: str, mod: str) -> bool:
    dst = _part(mod)
    if src == "top" or dst == "leaf":
        return True
    if src == "leaf":
        return False
    return dst == src or dst in ALLOWED[src]


def _source_part(rel: Path) -> str:
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "top" if rel.stem in TOP else "leaf"


def test_every_module_is_in_a_part():
    flat = {p.stem for p in PKG.glob("*.py")}
    assert flat == LEAVES | TOP, f"modules outside the parts: {sorted(flat - LEAVES - TOP)}"
    assert {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()} == set(ALLOWED)


def test_imports_point_one_way():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        src = _source_part(rel)
        for line, mod in _imports(path.read_text(), ["bsqcodec", *rel.parts[:-1]]):
            if not _allowed(src, mod):
                bad.append(f"{rel}:{line} ({src}) imports {mod} ({_part(mod)})")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_wrong_way_import():
    """Relative imports resolve from the importing module's package, including imports inside functions."""
    src = "from ..errors import BsqError\nfrom . import tokenizer\ndef f():\n    from ..codec import codec\n"
    found = _imports(src, ["bsqcodec", "model"])
    assert found == [(1, "bsqcodec.errors"), (2, "bsqcodec.model.tokenizer"), (4, "bsqcodec.codec.codec")]
    assert [_allowed("model", m) for _, m in found] == [True, True, False]
    assert not _allowed("leaf", "bsqcodec.format.container") and not _allowed("format", "bsqcodec.model.weights")
    assert not _allowed("codec", "bsqcodec.train.data") and _allowed("train", "bsqcodec.codec.search")
    assert not _allowed("bench", "bsqcodec.train.data") and not _allowed("model", "bsqcodec.pillow_plugin")
