"""Imports flow one way (ARCHITECTURE.md, the layer table): no module of diffpo_jax imports a module of a higher
layer, and none imports another module's private (underscore) names. Every import counts, also those
inside functions. A new module must be given a layer here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffpo_jax"

# bottom to top; a module may import its own layer and those below. "pkg.*": every module of pkg/ not
# named elsewhere; "pkg": the package itself (its __init__).
LAYERS = [
    ("basics", ["config", "sharding", "paths", "distributed", "jsonl", "chat"]),
    ("model", ["attention", "model", "lora"]),
    ("weights", ["weights", "weights.hf", "weights.gguf", "weights.checkpoint", "weights.peft"]),
    ("loading", ["sources", "weights.export"]),
    (
        "libraries",
        [
            "data",
            "data.*",
            "decoding",
            "decoding.*",
            "reward",
            "reward.*",
            "records",
            "records.formats",
            "records.output",
        ],
    ),
    ("loops", ["training", "training.*", "records.loop", "records.cli"]),
    ("pipelines", ["pipelines", "pipelines.*"]),
    ("CLIs", ["generate", "refine", "score", "serve", "train", "convert", "verify", "data.__main__"]),
]


def modules() -> dict[str, Path]:
    """'data.formats' -> its file, for every module of the package ('' is the package itself)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(name: str) -> int:
    exact = [i for i, (_, names) in enumerate(LAYERS) if name in names]
    if exact:
        return exact[0]
    package = [i for i, (_, names) in enumerate(LAYERS) if name.rpartition(".")[0] + ".*" in names]
    assert package, f"diffpo_jax.{name} has no layer: add it to LAYERS in {__file__}"
    return package[0]


def imports(path: Path, known: dict[str, Path]) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) of every diffpo_jax import in the module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "diffpo_jax"]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import (the package imports absolutely)"
            source = node.module or ""
            if source.split(".")[0] != "diffpo_jax":
                continue
            relative = source.removeprefix("diffpo_jax").removeprefix(".")
            modules_named = [a.name for a in node.names if f"{relative}.{a.name}".lstrip(".") in known]
            for a in modules_named:  # `from diffpo_jax.decoding import devices`: the module devices
                found.append((node.lineno, f"{source}.{a}", []))
            names = [a.name for a in node.names if a.name not in modules_named]
            if names or not modules_named:
                found.append((node.lineno, source, names))
    return [(line, src.removeprefix("diffpo_jax").removeprefix("."), names) for line, src, names in found]


def test_every_import_points_down_the_layers():
    known = modules()
    known.pop("")  # the package itself: empty
    upward, private = [], []
    for name, path in sorted(known.items()):
        for line, target, names in imports(path, known):
            assert target in known, f"{path}:{line}: diffpo_jax.{target} is no module of the package"
            if layer_of(target) > layer_of(name):
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({LAYERS[layer_of(name)][0]}) "
                    f"imports {target} ({LAYERS[layer_of(target)][0]})"
                )
            if target != name:
                private += [
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {name} imports {target}.{n}"
                    for n in names
                    if n.startswith("_")
                ]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def test_the_layers_name_only_modules_that_exist():
    known = modules()
    for _, names in LAYERS:
        for entry in names:
            assert entry.removesuffix(".*") in known, f"LAYERS names {entry}, which is no module of diffpo_jax"
