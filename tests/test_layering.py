"""The dependency direction index <- retrieval <- {training, server} <- CLI (GUIDE section 2)."""
import ast

from conftest import ROOT

ALLOWED = {
    "index": {"index"},
    "retrieval": {"index", "retrieval"},
    "training": {"index", "retrieval", "training"},
    "server": {"index", "retrieval", "server"},
}
OURS = {"index", "retrieval", "training", "server", "umr"}


def test_no_module_imports_upward():
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in (ROOT / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top in OURS and top not in allowed:
                        bad.append(f"{path.relative_to(ROOT)} imports {n}")
    assert not bad, bad
