"""The file tree shows the design: one module per backend, and no module imports another in a circle."""
import ast
import re

from conftest import ROOT

SOURCES = [ROOT / "mup_model.py", ROOT / "run_trainer.py", *sorted((ROOT / "mupgpt").rglob("*.py"))]


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path, known):
    """Modules of ours that `path` imports anywhere (a function-level import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycle():
    modules = {module_name(p): p for p in SOURCES}
    graph = {name: imports(path, modules) - {name} for name, path in modules.items()}
    # importing a.b.c runs the package a.b first
    for name in list(graph):
        for dep in list(graph[name]):
            parent = dep.rsplit(".", 1)[0]
            if parent in modules and parent != name and not name.startswith(parent + "."):
                graph[name].add(parent)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(stack + [dep])
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_backends_are_one_module_each_and_know_only_the_base():
    engines = ROOT / "mupgpt" / "engines"
    assert {p.name for p in engines.glob("*.py")} == {"__init__.py", "factory.py", "base.py", "single.py", "ddp.py",
                                                       "fsdp.py", "deepspeed_zero.py", "deepspeed_config.py",
                                                       "deepspeed_muon.py", "op_builds.py"}
    modules = {module_name(p): p for p in SOURCES}
    # a backend knows the base, the engine it extends (DDP the single one) and its own library's helpers
    allowed = {"single": set(), "ddp": {"mupgpt.engines.single"}, "fsdp": set(),
               "deepspeed_zero": {"mupgpt.engines.deepspeed_config", "mupgpt.engines.deepspeed_muon",
                                  "mupgpt.engines.op_builds"}}
    for backend, extra in allowed.items():
        deps = {d for d in imports(engines / f"{backend}.py", modules) if d.startswith("mupgpt.engines")}
        assert deps <= {"mupgpt.engines", "mupgpt.engines.base", *extra}, (backend, deps)
    # the engines' constructors take one shape of arguments
    import inspect

    from mupgpt.engines.base import Engine
    from mupgpt.engines.factory import engine_class
    shape = inspect.signature(Engine.__init__)
    for backend in ("single", "ddp", "fsdp", "deepspeed"):
        assert inspect.signature(engine_class(backend).__init__) == shape, backend
    # the model knows nothing of parallelism
    model_imports = imports(ROOT / "mup_model.py", modules)
    assert not model_imports and "distributed" not in (ROOT / "mup_model.py").read_text()


def test_tools_import_the_installed_package_not_each_other():
    """Scripts, bench and tests import the package as pip install -e . installs it: no sys.path edits (pytest's
    own pythonpath setting and conftest aside); no script imports the entry point or another script, and bench
    imports no script (it runs the trainer itself, so it may import the entry point)."""
    tools = [*(ROOT / "scripts").glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py"),
             ROOT / "run_trainer.py", ROOT / "mup_model.py", *(ROOT / "mupgpt").rglob("*.py")]
    edit = re.compile(r"sys\.path\.(insert|append)\(|syspath_prepend\(")
    edits = [str(p.relative_to(ROOT)) for p in tools if p.name != "conftest.py" and edit.search(p.read_text())]
    assert not edits, edits
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    for path in (ROOT / "scripts").glob("*.py"):
        assert not imports(path, scripts | {"run_trainer"}), path.name
    for path in (ROOT / "bench").glob("*.py"):
        assert not imports(path, scripts), path.name
