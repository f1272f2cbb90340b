"""The shape of the package (docs/layout: the rooms and their arrows), checked on its source with `ast`:
no import circle, lazy imports inside functions included; the core never imports a wing; engine
differences only in the engines and the session that builds them; no module past its size."""

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "cppo"
WINGS = ("cppo.continual", "cppo.sweep", "cppo.demo", "cppo.cli", "cppo.launch", "cppo.__main__")
# Applications on top of the trainer: the rest of the package (the core and the machinery) never imports them.


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The cppo modules `path` imports anywhere in it (top level, in functions, under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names if alias.name.split(".")[0] == "cppo")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cppo":
                continue
            # `from . import core` names a module; `from .core import x` names a module's attribute
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                modules.add(candidate if _is_module(candidate) else target)
    modules.discard(name)
    return {m for m in modules if _is_module(m)}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, as the modules along it, or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for other in sorted(graph.get(node, ())):
            # A package's __init__ is run before its submodules: importing a submodule imports its package.
            if state.get(other) == "open":
                return trail[trail.index(other):] + [other]
            if other not in state and (found := visit(other)) is not None:
                return found
        trail.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_import_graph_finds_a_circle_hidden_in_a_function():
    graph = {"cppo.a": {"cppo.b"}, "cppo.b": {"cppo.c"}, "cppo.c": {"cppo.a"}, "cppo.d": {"cppo.a"}}
    assert cycle(graph) == ["cppo.a", "cppo.b", "cppo.c", "cppo.a"]
    assert cycle({"cppo.a": {"cppo.b"}, "cppo.b": set()}) is None
    source = PACKAGE / "trainer.py"
    assert "cppo.session" in imports(source) and "cppo.core" in imports(source)


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_core_never_imports_a_wing():
    for module, imported in import_graph().items():
        # `cppo` itself is the public facade: it imports nothing until an attribute (cppo.run) is asked for.
        if module.startswith(WINGS) or module == "cppo":
            continue
        upward = sorted(m for m in imported if m.startswith(WINGS))
        assert not upward, f"{module} imports {upward}"


def test_no_branch_on_an_engine_name_outside_the_engines_and_the_session():
    # The config's schema validates the engine fields it declares; everything else reads what an engine returned.
    allowed = {"engine.py", "vllm_engine.py", "session.py", "config.py"}
    pattern = re.compile(r"""\.engine\s*[!=]=|[!=]=\s*["'](vllm|hf)["']|["'](vllm|hf)["']\s*[!=]=""")
    for path in PACKAGE.rglob("*.py"):
        if path.name in allowed:
            continue
        found = [line.strip() for line in path.read_text().splitlines() if pattern.search(line)]
        assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_no_module_past_its_size():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert path.name == "config.py" or lines <= 530, f"{path.relative_to(ROOT)} has {lines} lines"


def test_the_trainer_does_not_import_the_rollout_memory():
    assert "cppo.memory" not in imports(PACKAGE / "trainer.py")


def test_the_public_entry_points_keep_working():
    import cppo
    from cppo.cppo_trainer import CPPOTrainer
    from cppo.trainer import PPOTrainer

    assert (cppo.PPOTrainer, cppo.CPPOTrainer) == (PPOTrainer, CPPOTrainer) and issubclass(CPPOTrainer, PPOTrainer)
    assert cppo.UserError.__module__ == "cppo.errors" and cppo.load_config.__module__ == "cppo.config_loading"
    config = cppo.load_config(ROOT / "configs" / "ppo_tiny.yaml")
    assert isinstance(config, cppo.Config) and config.tasks[0].reward.function.startswith("cppo.toy:")


def test_the_layout_page_has_a_line_for_every_room():
    page = (ROOT / "docs" / "development" / "layout.md").read_text()
    tree = page.split("```", 2)[1]
    listed = set(re.findall(r"^  ([a-z_]+(?:\.py|/))", tree, flags=re.M))
    rooms = {p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    rooms |= {p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert rooms == listed, (sorted(rooms - listed), sorted(listed - rooms))
