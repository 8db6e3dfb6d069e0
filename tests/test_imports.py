"""The house reads top-down: no import circle among the project's own modules, lazy imports inside functions
included, and the root holds the teaching modules and the user's commands, not the benchmark."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PACKAGES = ("bench", "demo", "formats", "infra", "scoring")


def project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        modules |= {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py")
                    if p.stem not in ("__init__", "__main__")}
        modules[package] = ROOT / package / "__init__.py"
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every project module named by an import statement anywhere in the file, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules or {node.module}  # `from bench import grid` imports the module bench.grid
    return found & known


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_among_the_project_modules():
    modules = project_modules()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    # a package's submodules reach its __init__ only through the package: an edge to "bench" from bench.x is not
    # a circle of ours as long as __init__ imports nothing that imports it back, which the graph itself checks
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import anywhere in the file reaches (`from a import b` gives a and a.b), function bodies
    included, with importlib.import_module("x") and __import__("x") calls."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in \
                ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(node.args[0].value)
    return names


def test_the_trainer_imports_neither_its_demo_nor_the_dataset_generator():
    """The embedded default is one caller of train.py: the caller depends on the trainer, never the reverse."""
    parts = {part for name in imported_names(ROOT / "train.py") for part in name.split(".")}
    assert "torch" in parts and parts & {"demo", "tower", "synth"} == set()


def test_imported_names_sees_imports_inside_functions(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import os\n\ndef later():\n    from synth import ATTRIBUTES\n    import demo.tower\n"
                       "    return importlib.import_module('demo_tower')\n")
    assert imported_names(planted) == {"os", "synth", "synth.ATTRIBUTES", "demo.tower", "demo_tower"}


def test_the_root_holds_no_benchmark_files():
    assert not list(ROOT.glob("bench*.py"))
    assert (ROOT / "bench" / "__main__.py").is_file()


def test_the_root_shows_the_model_and_the_commands():
    """The embedded default, the metric implementations, the dataset formats and the run's plumbing live in folders,
    so the root lists the model's files and the user's commands, and few else."""
    root = sorted(p.stem for p in ROOT.glob("*.py"))
    assert len(root) <= 22, root
    assert {"clip", "qwen3", "lora", "projectors", "vlm", "train", "evaluate", "caption", "export"} <= set(root)
    assert not {"demo", "synth", "bert", "manifests", "checkpoint", "errors"} & set(root)
