"""The package's module graph: no import cycle (module-level imports), and the device side never
imports the training side."""
from __future__ import annotations

import ast

import pytest
from conftest import ROOT

PACKAGES = {"edgemeta": ROOT / "edgemeta", "edgemeta.export": ROOT / "export", "edgemeta.runtime": ROOT / "runtime"}


def module_graph(lazy: bool = False) -> dict[str, set[str]]:
    """Module → the modules of ours it imports: at module level, or with lazy=True anywhere (inside
    functions too: what runs when the function does)."""
    files = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        tree = ast.parse(path.read_text())
        for node in (ast.walk(tree) if lazy else tree.body):  # module level: what runs at import time
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


@pytest.mark.parametrize("lazy", [False, True])
def test_no_import_cycles(lazy):
    """No cycle at import time, nor through the imports functions make when they run (a lazy cycle
    is a design knot: algorithms ↔ evaluate ↔ checkpoint was one)."""
    graph = module_graph(lazy)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_runtime_imports_nothing_else_of_ours():
    graph = module_graph()
    for name, deps in graph.items():
        if name.startswith("edgemeta.runtime"):
            assert all(d.startswith("edgemeta.runtime") for d in deps), (name, deps)


def test_device_commands_import_no_training_side_module(tmp_path):
    """`edgemeta predict|enroll|forget|classes` register only the device module: no training,
    export, data or serve code, no torch (a per-image loop on a Jetson pays every import)."""
    import subprocess
    import sys
    code = ("import sys; sys.argv = ['edgemeta', 'classes', '--store', sys.argv[1]]\n"
            "from edgemeta.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('edgemeta', 'torch', 'onnx.', 'fastapi', 'cv2')))))")
    loaded = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "edgemeta.cli.device_actions" in loaded
    training_side = [m for m in loaded if m.startswith(("edgemeta.cli.training", "edgemeta.cli.export", "edgemeta.cli.serve",
                                                         "edgemeta.cli.watch", "edgemeta.cli.data", "edgemeta.train",
                                                         "edgemeta.config", "edgemeta.data", "edgemeta.export", "torch",
                                                         "fastapi", "cv2"))]
    assert training_side == []


def test_device_commands_in_a_loop_import_neither_typer_nor_rich_nor_package_metadata(tmp_path):
    """`edgemeta enroll|predict|classes …` in a per-image loop: no typer or click (the fast path reads
    the command line), no rich (their tables are plain columns; rich only for an error), and ONNX
    Runtime's TensorRT options (which read package metadata) only where the TensorRT provider is present."""
    import subprocess
    import sys

    import numpy as np
    from conftest import TINY_BUNDLE
    from PIL import Image
    image = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(image)
    code = ("import atexit, sys; sys.argv = ['edgemeta', *sys.argv[1:]]\n"
            "atexit.register(lambda: print('loaded:', *sorted(m for m in sys.modules if m.startswith(('rich', "
            "'importlib.metadata', 'typer', 'click'))), file=sys.stderr))\n"  # the command ends the process
            "from edgemeta.cli import main\n"
            "main()\n")
    for argv, printed in ((["enroll", TINY_BUNDLE, image, "--store", tmp_path / "s", "--label", "a"], "enrolled 'a'"),
                          (["predict", TINY_BUNDLE, "--store", tmp_path / "s", "--json", image], '"label": "a"'),
                          (["predict", TINY_BUNDLE, "--store", tmp_path / "s", image, image],
                           f"image{' ' * (len(str(image)) - 3)}label  probability  distance\n{image}  a      1.00"),
                          (["classes", "--store", tmp_path / "s"], "class  shots\na      1\n")):
        done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, check=True)
        assert printed in done.stdout, done.stdout
        assert done.stderr.split() == ["loaded:"], argv[0]  # the exit hook ran, and none of them were loaded


def test_the_torch_free_modules_of_edgemeta_stay_torch_free():
    """The modules the device CLI and `edgemeta data` import must not import torch, even indirectly."""
    import subprocess
    import sys
    modules = ["edgemeta.config", "edgemeta.data.catalog", "edgemeta.cli.common", "edgemeta.cli.device",
               "edgemeta.cli.serve", "edgemeta.cli.watch", "edgemeta.cli.gallery", "edgemeta.cli.data", "edgemeta.runtime"]
    code = "import sys, importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
