"""Static checks of the Slicer module files: they compile, pass the linter, and agree with their .ui files."""

import ast
import py_compile
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["DeepLungReg", "DeepLungRegTraining"]

# name suffix -> widget classes acceptable for it
SUFFIX_CLASSES = {
    "Selector": {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "QComboBox"},
    "Button": {"QPushButton"},
    "CheckBox": {"QCheckBox"},
    "Label": {"QLabel"},
    "SpinBox": {"QSpinBox"},
    "Edit": {"ctkPathLineEdit", "QLineEdit"},
    "Bar": {"QProgressBar"},
    "Text": {"QPlainTextEdit"},
}
# parameter type -> widget classes that parameterNodeWrapper's connectGui binds to it
# (Slicer's guiConnectors.py: a QComboBox needs a Choice annotation; ctkPathLineEdit binds to pathlib.Path only)
TYPE_CLASSES = {"node": {"qMRMLNodeComboBox"}, "bool": {"QCheckBox"}, "int": {"QSpinBox", "QSlider"},
                "choice": {"QComboBox"}, "str": {"QLineEdit", "QTextEdit"},
                "path": {"ctkPathLineEdit", "ctkDirectoryButton"}}


def ui_widgets(module: str) -> tuple[dict[str, ET.Element], dict[str, str]]:
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    params = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                params[prop.find("string").text] = name
    return widgets, params


def _choices(node: ast.expr) -> tuple[list[str], bool]:
    """Items of a ``Choice(...)`` argument: a list literal, a name from ``DeepLungRegLib.options``, or
    ``METHODS`` (the method registry). Returns (items, filled_at_runtime_from_the_registry)."""
    if isinstance(node, ast.List):
        return [e.value for e in node.elts], False
    if isinstance(node, ast.Name) and node.id == "METHODS":
        from DeepLungRegLib.methods import method_names

        return method_names(), True
    if isinstance(node, ast.Name):
        from DeepLungRegLib import options

        return list(getattr(options, node.id)), False
    raise AssertionError(f"unsupported Choice argument {ast.unparse(node)}")


def parameter_fields(module: str) -> dict[str, tuple[str, list[str] | None, bool]]:
    """Fields of the @parameterNodeWrapper class: name -> (kind, choices, choices come from the registry)."""
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        if any(getattr(d, "id", None) == "parameterNodeWrapper" for d in cls.decorator_list):
            fields = {}
            for stmt in cls.body:
                if isinstance(stmt, ast.AnnAssign):
                    ann = ast.unparse(stmt.annotation)
                    choices, registry = None, False
                    if "Choice(" in ann:
                        kind = "choice"
                        call = next(n for n in ast.walk(stmt.annotation) if isinstance(n, ast.Call)
                                    and getattr(n.func, "id", "") == "Choice")
                        choices, registry = _choices(call.args[0])
                    elif ann.startswith("vtkMRML"):
                        kind = "node"
                    elif ann in ("Path", "pathlib.Path"):
                        kind = "path"
                    elif "int" in ann:
                        kind = "int"
                    elif "bool" in ann:
                        kind = "bool"
                    else:
                        kind = "str"
                    fields[stmt.target.id] = (kind, choices, registry)
            return fields
    raise AssertionError(f"{module}: no @parameterNodeWrapper class")


def ui_references(module: str) -> set[str]:
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


@pytest.mark.parametrize("module", MODULES)
def test_every_referenced_widget_exists_with_expected_class(module):
    widgets, _ = ui_widgets(module)
    refs = ui_references(module)
    assert refs, "the widget code refers to no ui widget"
    for name in refs:
        assert name in widgets, f"{module}.py uses self.ui.{name}, missing from {module}.ui"
        suffix = next((s for s in SUFFIX_CLASSES if name.endswith(s)), None)
        assert suffix, f"{name}: unknown naming convention"
        assert widgets[name].get("class") in SUFFIX_CLASSES[suffix], f"{name} is a {widgets[name].get('class')}"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_match_parameter_node_fields(module):
    widgets, params = ui_widgets(module)
    fields = parameter_fields(module)
    assert params, "no widget is bound to the parameter node"
    for param, widget in params.items():
        assert param in fields, f"{widget} is bound to {param!r}, not a field of the parameter node"
        kind, choices, registry = fields[param]
        cls = widgets[widget].get("class")
        assert cls in TYPE_CLASSES[kind], f"{param} ({kind}) bound to a {cls}"
        if choices is not None:
            items = [i.find("property/string").text for i in widgets[widget].findall("item")]
            # connectGui refills a bound QComboBox from the Choice; a registry-driven list is left empty in the .ui
            assert items == choices or (registry and not items), f"{widget} items {items} != choices {choices}"


@pytest.mark.parametrize("module", MODULES)
def test_module_files_compile_and_pass_the_linter(module, tmp_path):
    path = ROOT / module / f"{module}.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "m.pyc"), doraise=True)
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    proc = subprocess.run([ruff, "check", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cmake_lists_every_library_file(tmp_path):
    """Each module's CMakeLists ships every library file, subpackages included (methods/...),
    evaluated with cmake itself when it is installed."""
    for module in MODULES:
        cmake = (ROOT / module / "CMakeLists.txt").read_text()
        lib_files = sorted(str(f.relative_to(ROOT / module)).replace("\\", "/")
                           for f in (ROOT / module / f"{module}Lib").rglob("*.py") if "__pycache__" not in f.parts)
        glob = "file(GLOB_RECURSE _library_scripts RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} CONFIGURE_DEPENDS\n" \
               "  ${CMAKE_CURRENT_SOURCE_DIR}/${MODULE_NAME}Lib/*.py)"
        if glob in cmake:
            assert "${_library_scripts}" in cmake.split("set(MODULE_PYTHON_SCRIPTS", 1)[1].split(")", 1)[0]
            exe = shutil.which("cmake")
            if exe:
                (tmp_path / "CMakeLists.txt").write_text(
                    f"cmake_minimum_required(VERSION 3.16)\nproject(check NONE)\nset(MODULE_NAME {module})\n"
                    f"set(CMAKE_CURRENT_SOURCE_DIR {(ROOT / module).as_posix()})\n{glob}\nlist(SORT _library_scripts)\n"
                    "file(WRITE ${CMAKE_BINARY_DIR}/scripts.txt \"${_library_scripts}\")\n")
                subprocess.run([exe, "-S", str(tmp_path), "-B", str(tmp_path / "build")], check=True,
                               capture_output=True)
                assert sorted((tmp_path / "build" / "scripts.txt").read_text().split(";")) == lib_files
        else:
            for f in lib_files:
                assert f"${{MODULE_NAME}}Lib/{f.split('/', 1)[1]}" in cmake, f"{module}/CMakeLists.txt misses {f}"
        for res in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui",
                    "Resources/requirements.txt"):
            assert res in cmake
            assert (ROOT / module / res.replace("${MODULE_NAME}", module)).is_file()
        assert "WITH_GENERIC_TESTS" in cmake
    top = (ROOT / "CMakeLists.txt").read_text()
    for module in MODULES:
        assert f"add_subdirectory({module})" in top
