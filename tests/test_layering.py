"""One import root and one direction: umr.index <- umr.retrieval <- {umr.training, umr.server}
<- the CLI (umr/), each layer in its own top-level folder of the repository."""
import ast
import subprocess
import sys

from conftest import ROOT

ALLOWED = {
    "index": {"index"},
    "retrieval": {"index", "retrieval"},
    "training": {"index", "retrieval", "training"},
    "server": {"index", "retrieval", "server"},
}
LAYERS = {"index", "retrieval", "training", "server"}


def imported_names(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_no_module_imports_upward_and_every_import_goes_through_umr():
    bad = []
    for folder in [*ALLOWED, "umr"]:
        for path in (ROOT / folder).rglob("*.py"):
            for name in imported_names(path):
                parts = name.split(".")
                if parts[0] in LAYERS:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}: use umr.{name}")
                elif parts[0] == "umr" and folder in ALLOWED:
                    layer = parts[1] if len(parts) > 1 and parts[1] in LAYERS else "umr"
                    if layer not in ALLOWED[folder]:
                        bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_only_umr_is_importable_from_outside_the_clone(tmp_path):
    """A user's own `index` or `server` module is not shadowed: the installed package puts
    nothing at the top level but `umr`."""
    code = ("import importlib.util as u, umr.index, umr.retrieval, umr.training, umr.server; "
            "print([m for m in ('index', 'retrieval', 'training', 'server') if u.find_spec(m)])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] == "umr" else ["umr", *parts])


def import_graph() -> dict[str, set[str]]:
    """umr module -> the umr modules it imports, at the top or inside functions alike (an import
    deferred to call time is still an arrow between two modules)."""
    paths = {module_name(p): p for folder in [*ALLOWED, "umr"] for p in (ROOT / folder).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        out = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                       for n in ast.walk(block)}  # names for annotations only, never imported at run time
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            out |= {t for t in targets if t in paths and t != name and not name.startswith(t + ".")}
        graph[name] = out
    return graph


def test_no_import_circles():
    """Packages' __init__ re-exports aside (a package importing its own modules is not a circle),
    no module reaches itself through the modules it imports."""
    graph = import_graph()
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_rooms_stay_small():
    """No module in the package folders over 400 lines and no function over 80 (parsers
    included): a room that outgrows this is split by job, not squeezed."""
    too_big, too_long = [], []
    for folder in ("index", "retrieval", "training", "server", "umr"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            lines = len(text.splitlines())
            if lines > 400:
                too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                    f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_big and not too_long, too_big + too_long
