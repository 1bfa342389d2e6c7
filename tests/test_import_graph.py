"""The house's import rules, checked on the source (every import, module-level or inside a
function): arrows point inward (cli -> train/export -> tuners -> circuits), and no two modules of
qpeft or benchmarks import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what each part of qpeft may import from qpeft (its own part is always allowed)
ALLOWED = {
    "circuits": set(),
    "_peft_registry": set(),
    "_quiet": set(),
    "tuners": {"circuits", "_peft_registry"},
    "assets": set(),
    "quantize": set(),
    "hotswap": {"tuners"},
    "train": {"tuners", "circuits", "assets", "quantize"},
    "export": {"tuners", "circuits", "assets"},
}


def _imports(path: Path, package: str) -> set[str]:
    """Dotted names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(ROOT).with_suffix("").parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + (1 if path.name == "__init__.py" else 0)]
                name = ".".join(base + ((node.module,) if node.module else ()))
            else:
                name = node.module or ""
            # `from pkg import module` imports the module; `from pkg import name`, pkg itself
            subs = {f"{name}.{a.name}" for a in node.names}
            modules = {m for m in subs if _is_module(m)}
            out |= modules if modules == subs else {name} | modules
    return {n for n in out if n == package or n.startswith(package + ".")}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_qpeft_imports_point_inward():
    bad = []
    for name, path in _modules("qpeft").items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] in ("cli", "__main__"):
            continue  # the package __init__ and the command line may import anything
        part = parts[1]
        for target in _imports(path, "qpeft"):
            tparts = target.split(".")
            if len(tparts) < 2:
                bad.append(f"{name} imports the package root")
            elif tparts[1] != part and tparts[1] not in ALLOWED[part]:
                bad.append(f"{name} -> {target}")
    assert bad == []


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for package in ("qpeft", "benchmarks"):
        mods = _modules(package)
        for name, path in mods.items():
            graph[name] = {t for t in _imports(path, package) if t in mods and t != name}
    # a package __init__ importing its own submodules is not a circle between modules
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    seen: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in graph[node]:
            if seen.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = 2

    for node in graph:
        if node not in seen:
            visit(node, [node])
    assert circles == []


def test_only_a_method_s_folder_names_its_config_class():
    """A method is its folder: outside ``qpeft/tuners/`` (and the package ``__init__``, which
    exports the public names) no module of qpeft or benchmarks names a qpeft method's config
    class; they go through the registry."""
    import qpeft  # noqa: F401  (registers the methods)
    from qpeft.tuners.registry import methods

    names = {spec.config_cls.__name__ for spec in methods(ours=True)}
    offenders = []
    for package in ("qpeft", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("qpeft/tuners/") or rel == "qpeft/__init__.py":
                continue
            text = path.read_text()
            offenders += [f"{rel}: {name}" for name in sorted(names) if name in text]
    assert offenders == []
