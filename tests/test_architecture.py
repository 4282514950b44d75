"""The layering of docs/ARCHITECTURE.md, checked on the source: no import cycle among psilora_ds modules
(imports inside functions and under TYPE_CHECKING count), no private member read on anything but
``self``/``cls`` (the optimizer/engine contract is public), and no library module importing the recipe."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_modules() -> dict[str, str]:
    """``{dotted module name: path}`` of psilora_ds (a package is its ``__init__``)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "psilora_ds")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def imported_modules(module: str, path: str, known: dict[str, str]) -> set[str]:
    """The psilora_ds modules ``module`` imports anywhere in its source."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1]) + (f".{node.module}" if node.module else "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_and_the_library_never_imports_the_recipe():
    known = package_modules()
    graph = {m: imported_modules(m, p, known) for m, p in known.items()}
    assert cycles(graph) == []
    library = [m for m in graph if not m.startswith("psilora_ds.recipe")]
    assert {m: sorted(t for t in graph[m] if t.startswith("psilora_ds.recipe")) for m in library} == \
        {m: [] for m in library}


# third-party members whose documented API has a leading underscore (the reason given)
DOCUMENTED_PRIVATE = {"config._register_custom_module": "peft's custom LoRA layers (developer_guides/custom_models)"}


def test_no_private_member_read_across_objects():
    paths = [*package_modules().values(), os.path.join(ROOT, "launch", "train.py")]
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")) and ast.unparse(node) != "os._exit" \
                        and ast.unparse(node) not in DOCUMENTED_PRIVATE:
                    found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert found == []


def layer_table() -> list[tuple[str, list[str]]]:
    """ARCHITECTURE.md's layers in order, each with the files or folders its ``files`` column names (paths relative
    to the repository; a bare name is relative to the folder of the cell's first path)."""
    rows = []
    for line in open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        paths, folder = [], ""
        for token in cells[1].split("`")[1::2]:
            if "/" in token.rstrip("/"):
                folder = token.rsplit("/", 1)[0] + "/" if not token.endswith("/") else ""
                paths.append(token)
            else:
                paths.append(folder + token)
        rows.append((cells[0], paths))
    return rows


def layer_of(path: str, table: list[tuple[str, list[str]]]) -> int | None:
    rel = os.path.relpath(path, ROOT)
    for index, (_, paths) in enumerate(table):
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in paths):
            return index
    return None


def test_every_module_is_in_the_layer_table_and_imports_only_layers_above_it():
    known = package_modules()
    table = layer_table()
    assert [name for name, _ in table][:3] == ["kernels", "reference", "capture"]
    layers = {m: layer_of(p, table) for m, p in known.items()}
    assert sorted(m for m, layer in layers.items() if layer is None) == []
    upward = [f"{m} ({table[layers[m]][0]}) imports {t} ({table[layers[t]][0]})"
              for m, p in known.items() for t in imported_modules(m, p, known) if layers[t] > layers[m]]
    assert upward == []


def test_the_checks_can_fail():
    """The cycle finder sees a cycle, and the import resolver follows relative imports."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    table = layer_table()
    assert layer_of(os.path.join(ROOT, "psilora_ds", "products.py"), table) == 2  # a bare name in the capture row
    assert layer_of(os.path.join(ROOT, "psilora_ds", "optim", "base.py"), table) > layer_of(
        os.path.join(ROOT, "psilora_ds", "ops", "lorsum.py"), table)
    assert layer_of(os.path.join(ROOT, "psilora_ds", "nowhere.py"), table) is None
    known = package_modules()
    assert "psilora_ds.distributed.base" in imported_modules(
        "psilora_ds.optim.base", known["psilora_ds.optim.base"], known) | imported_modules(
        "psilora_ds.distributed", known["psilora_ds.distributed"], known)


MAX_CLASS_METHODS = 25
MAX_FILE_LINES = 450


def test_no_class_over_25_methods_and_no_file_over_450_lines():
    """Each class one responsibility, each file one job (docs/ARCHITECTURE.md): the sizes that say so."""
    too_big = []
    for module, path in package_modules().items():
        source = open(path).read()
        if source.count("\n") > MAX_FILE_LINES:
            too_big.append(f"{path}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                methods = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body)
                if methods > MAX_CLASS_METHODS:
                    too_big.append(f"{module}.{node.name}: {methods} methods")
    assert too_big == []
