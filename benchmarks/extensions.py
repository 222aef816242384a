"""How well the variation points stay in their own modules: one JSON line, read from the source alone.

    python benchmarks/extensions.py [--src src/splitlm]

- ``keys``: for each remedy, defense, detector, server attack and aggregation key, the src modules whose code
  reads it (``{"key", "modules"}``; target: at most 2 each). The keys are every name the component registries
  know (``frameworks.base.COMPONENT_KEYS``) plus the flat config keys those components replaced. A module reads a
  key when its code names it: an attribute or variable of that name, or a string that is exactly the key (a
  comparison, a registration, a look-up). Prose that mentions a key (docstrings, comments, error messages) is
  not a read; ``mentioned_in`` counts the modules whose text names the key anywhere, prose included.
- ``largest_class_lines``: the longest class in src and where it is (target: at most about 300 lines).
- ``assemblies``: the functions that construct a federation's parties, i.e. call ``Federation(...)`` (target: 1,
  ``build_parties``), listed in ``assembly_places``; ``server_builders`` lists the functions that build a server and
  its mods (``make_server(...)``, ``server_chain(...)``): ``host``, the server's half of ``build_parties``, which
  Ray's server actor also runs in its own process.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

# The flat config keys of remedies, defenses and aggregation before they became components (issue 21), so that a
# leftover read of one is counted too.
FORMER_KEYS = (
    "logit_adjustment", "align_kl", "align_every", "personalize", "multi_exit", "exit_weight", "replay", "ema",
    "prune", "el2n", "client_update", "client_update_every", "local_loss", "aggregation_lr", "async_mix",
    "staleness_exponent", "max_staleness", "round_window_s", "server_lr_scale", "mu_splitfed", "semi_async",
    "splitguard", "server_attack", "fsha", "dxp", "santext", "custext", "smashed_noise", "grad_noise", "nopeek",
    "label_dp",
)  # fmt: skip
ASSEMBLERS = ("Federation",)
SERVER_BUILDERS = ("make_server", "server_chain")


# Registries whose built-in names are everyday words (the learning-rate scales none, linear, sqrt: torch.sqrt is not a
# read of them); their config key (server_lr_scale) and MU-SplitFed's name are counted through FORMER_KEYS.
GENERIC_NAMES = ("framework.server_lr_scale",)


def registered_keys() -> list[str]:
    """Every name a component registry knows (remedies, defenses, detectors, aggregation strategies, server attacks)."""
    from splitlm.frameworks.base import COMPONENT_KEYS, component_registry

    keys = [key for key in COMPONENT_KEYS if key not in GENERIC_NAMES]
    return sorted({name for key in keys for name in component_registry(key).names()})


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def names_read(tree: ast.AST) -> set[str]:
    """The identifiers and exact strings a module's code uses (not its docstrings or messages)."""
    skip = _docstrings(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value.strip()
            if text.isidentifier():
                found.add(text)
            elif ":" in text and text.partition(":")[0].isidentifier():  # "el2n:0.5", a name with its argument
                found.add(text.partition(":")[0])
    return found


def callers(tree: ast.AST, constructors: tuple[str, ...]) -> set[str]:
    """The functions (qualified by class) that call one of ``constructors``."""
    places = set()

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, f"{where}.{child.name}" if where else child.name)
                continue
            if isinstance(child, ast.Call):
                func = child.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in constructors:
                    places.add(where or "<module>")
            visit(child, where)

    visit(tree, "")
    return places


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src" / "splitlm"))
    args = parser.parse_args()
    src = Path(args.src)
    root = src.parent
    modules = {path.relative_to(root).as_posix(): ast.parse(path.read_text()) for path in sorted(src.rglob("*.py"))}
    reads = {module: names_read(tree) for module, tree in modules.items()}
    keys = sorted(set(registered_keys()) | set(FORMER_KEYS))
    texts = {module: (root / module).read_text() for module in modules}
    rows = [
        {
            "key": key,
            "modules": [m for m, names in reads.items() if key in names],
            "mentioned_in": len([m for m, text in texts.items() if re.search(rf"\b{key}\b", text)]),
        }
        for key in keys
    ]
    classes = [
        (node.end_lineno - node.lineno + 1, f"{module}:{node.name}")
        for module, tree in modules.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None
    ]
    lines, where = max(classes)
    places = sorted(f"{module}:{place}" for module, tree in modules.items() for place in callers(tree, ASSEMBLERS))
    servers = sorted(
        f"{module}:{place}" for module, tree in modules.items() for place in callers(tree, SERVER_BUILDERS)
    )
    print(
        json.dumps(
            {
                "keys": rows,
                "keys_over_2": [row["key"] for row in rows if len(row["modules"]) > 2],
                "largest_class_lines": lines,
                "largest_class": where,
                "assemblies": len(places),
                "assembly_places": places,
                "server_builders": servers,
            }
        )
    )


if __name__ == "__main__":
    main()
