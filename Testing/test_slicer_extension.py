"""What the Slicer application needs from the extension, checked without the application:
the module files are read as source (Qt cannot run here), the torch-free library parts are
imported in a child Python where torch & co. cannot be imported, and the packaging files are
compared with the rules Slicer's ExtensionsIndex applies. Issue 12 names the defects."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["DeepLungReg", "DeepLungRegTraining"]
LIB = ROOT / "DeepLungReg" / "DeepLungRegLib"

# What Slicer does not ship: importing any of these in the GUI before the dependency step fails.
NOT_IN_SLICER = ["torch", "safetensors", "skimage", "scipy", "tqdm", "matplotlib", "psutil"]
# Library modules the module files may import before the dependency step (and in the GUI at all).
GUI_SAFE = {"dependencies", "options", "methods", "model_catalog", "process", "device_probe", "slicer_logic",
            "slicer_io", "io", "errors", "metrics"}
# Library modules the module files import at their top level: these must also load on an old Slicer.
TOP_LEVEL_SAFE = {"dependencies", "options", "methods"}


def module_tree(module: str) -> ast.Module:
    return ast.parse((ROOT / module / f"{module}.py").read_text())


def method_node(module: str, cls_suffix: str, name: str) -> ast.FunctionDef:
    for cls in (n for n in module_tree(module).body if isinstance(n, ast.ClassDef)):
        if cls.name == f"{module}{cls_suffix}":
            for f in cls.body:
                if isinstance(f, ast.FunctionDef) and f.name == name:
                    return f
    raise AssertionError(f"{module}{cls_suffix}.{name} not found")


def lib_imports(node: ast.AST) -> set[str]:
    """``DeepLungRegLib.X`` modules imported anywhere below ``node`` (X, or the names of
    ``from DeepLungRegLib import X``)."""
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("DeepLungRegLib"):
            parts = n.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(a.name for a in n.names)
        elif isinstance(n, ast.Import):
            found.update(a.name.split(".")[1] for a in n.names if a.name.startswith("DeepLungRegLib."))
    return found


def calls(node: ast.AST) -> list[str]:
    """Called expressions below ``node``, in source order."""
    found = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    return [ast.unparse(n.func) for n in sorted(found, key=lambda n: (n.lineno, n.col_offset))]


# --------------------------------------------------------------------------- defect 1
BLOCKER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not shipped with Slicer)")
sys.meta_path.insert(0, Block())
"""


def run_without(code: str, blocked=NOT_IN_SLICER) -> subprocess.CompletedProcess:
    env_path = f"{ROOT / 'DeepLungReg'}"
    script = BLOCKER + f"sys.path.insert(0, {env_path!r})\n" + code
    return subprocess.run([sys.executable, "-c", script, ",".join(blocked)], capture_output=True, text=True,
                          timeout=120)


def test_module_opening_path_imports_only_gui_safe_library_parts():
    """Defect 1: setup/enter/model listing imported slicer_logic -> modelfile -> torch."""
    for module in MODULES:
        tree = module_tree(module)
        top = lib_imports(ast.Module(body=[n for n in tree.body if not isinstance(n, ast.ClassDef)], type_ignores=[]))
        assert top <= TOP_LEVEL_SAFE, f"{module}.py imports {top - TOP_LEVEL_SAFE} at import time"
        everything = lib_imports(tree)
        widget_logic = set()
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.endswith("Test")):
            widget_logic |= lib_imports(cls)
        assert widget_logic <= GUI_SAFE, f"{module} GUI imports {widget_logic - GUI_SAFE}"
        assert everything  # the self-tests may import more (after their dependency check)


def test_gui_safe_library_parts_import_and_list_models_without_torch_and_co():
    """Defect 1: with torch, safetensors, scikit-image, scipy, tqdm, matplotlib and psutil absent,
    the module's GUI-side library parts import and describe the shipped model."""
    pytest.importorskip("slicer")  # slicer_logic / slicer_io need the MRML classes
    mods = ", ".join(f"DeepLungRegLib.{m}" for m in sorted(GUI_SAFE))
    code = f"""
import importlib
for m in [{", ".join(repr(f"DeepLungRegLib.{m}") for m in sorted(GUI_SAFE))}]:
    importlib.import_module(m)
from DeepLungRegLib.model_catalog import model_folders, model_label, model_summary
from DeepLungRegLib.methods import method_names
folders = model_folders([])
assert folders, "the shipped model is not found"
print(model_label(folders[0]))
print(model_summary(folders[0]))
print(method_names())
leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
assert not leaked, leaked
"""
    proc = run_without(code)
    assert proc.returncode == 0, f"importing {mods} without {NOT_IN_SLICER}:\n{proc.stderr[-3000:]}"
    assert "default (shipped): hering2021, 64×48×64" in proc.stdout
    assert "Method: hering2021: Multilevel U-Nets" in proc.stdout and "Card: Default model: hering2021" in proc.stdout


def test_model_catalog_reads_the_same_metadata_as_modelfile(tmp_path):
    """The header reader agrees with the safetensors library on the shipped model and refuses non-models."""
    from DeepLungRegLib.model_catalog import default_model_path, read_header_metadata
    from DeepLungRegLib.modelfile import read_metadata

    assert read_header_metadata(default_model_path()) == read_metadata(default_model_path())
    from DeepLungRegLib.errors import InputError

    for content in (b"", b"\x05\x00", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", b"\xff" * 8 + b"{}",
                    (2).to_bytes(8, "little") + b"{}"):
        bad = tmp_path / "model.safetensors"
        bad.write_bytes(content)
        with pytest.raises(InputError):
            read_header_metadata(tmp_path)


# --------------------------------------------------------------------------- defect 5
def test_minimum_slicer_version_is_declared_consistently():
    from DeepLungRegLib import dependencies as d

    text = f"{d.MINIMUM_SLICER_VERSION[0]}.{d.MINIMUM_SLICER_VERSION[1]}"
    top = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(DeepLungReg_MINIMUM_SLICER_VERSION "{text}")' in top
    assert "find_package(Slicer ${DeepLungReg_MINIMUM_SLICER_VERSION} REQUIRED)" in top
    readme = (ROOT / "README.md").read_text()
    slicer_section = readme.split("## In 3D Slicer", 1)[1].split("\n## ", 1)[0]
    assert f"Slicer {text}" in slicer_section and f"Python {d.MINIMUM_SLICER_PYTHON[0]}.{d.MINIMUM_SLICER_PYTHON[1]}" in slicer_section
    for module in MODULES:
        src = (ROOT / module / f"{module}.py").read_text()
        assert f"Slicer {text} or newer" in src  # help text
    # the Python of that Slicer satisfies the libraries' requirement, which matches pyproject
    assert d.MINIMUM_SLICER_PYTHON >= d.MINIMUM_PYTHON
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'requires-python = ">={d.MINIMUM_PYTHON[0]}.{d.MINIMUM_PYTHON[1]}"' in pyproject


def test_version_check_messages():
    from DeepLungRegLib.dependencies import version_problem

    assert "5.10 or newer" in version_problem((3, 9, 10), (5, 8))
    assert "Python 3.10 or newer" in version_problem((3, 9), None)
    assert version_problem((3, 12, 10), (5, 10)) is None
    assert version_problem((3, 12), (6, 0)) is None


def test_module_files_tell_old_slicer_users_instead_of_failing():
    """The module files and what they import at their top level parse on Slicer 5.8's Python
    (3.9), and each widget checks the version before loading its UI."""
    files = [ROOT / m / f"{m}.py" for m in MODULES] + [LIB / "dependencies.py", LIB / "options.py"]
    for f in files:
        ast.parse(f.read_text(), filename=str(f), feature_version=(3, 9))
    for module in MODULES:
        setup = method_node(module, "Widget", "setup")
        first = [c for c in calls(setup) if c in ("slicer_version_problem", "slicer.util.loadUI")]
        assert first[:1] == ["slicer_version_problem"], f"{module}: the version check must come before loadUI"


# --------------------------------------------------------------------------- defect 6
def test_both_modules_run_the_shared_dependency_step_before_starting():
    for module, handler in (("DeepLungReg", "onApplyButton"), ("DeepLungRegTraining", "onStartButton")):
        fn = method_node(module, "Widget", handler)
        order = [c for c in calls(fn) if c in ("self.logic.ensureDependencies", "launch", "ProcessWatcher")]
        assert order and order[0] == "self.logic.ensureDependencies", f"{module}.{handler}: {order}"
        ensure = method_node(module, "Logic", "ensureDependencies")
        assert "ensure_in_slicer" in calls(ensure)
        assert "REQUIREMENTS" in ast.unparse(ensure)
        src = (ROOT / module / f"{module}.py").read_text()
        assert 'REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", ' \
               '"requirements.txt")' in src
        for pkg in ('"scikit-image"', '"safetensors"', "REQUIRED_MODULES", "pip_install"):  # no own list or installer
            assert pkg not in src


def test_requirements_files_are_one_list_with_what_the_children_import():
    """Both modules install their resources into one folder (qt-scripted-modules/Resources), so
    the two requirements files must be identical; they hold what the child processes import."""
    from DeepLungRegLib.dependencies import read_requirements, requirement_name

    reg = ROOT / "DeepLungReg" / "Resources" / "requirements.txt"
    tra = ROOT / "DeepLungRegTraining" / "Resources" / "requirements.txt"
    assert reg.read_text() == tra.read_text()
    names = {requirement_name(r) for r in read_requirements(reg)}
    assert {"torch", "scikit-image", "scipy", "safetensors", "tqdm", "psutil", "matplotlib"} <= names
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'"([A-Za-z0-9_.-]+)[<>=!~]', pyproject.split("dependencies = [", 1)[1].split("]", 1)[0])
    bundled = {"numpy", "simpleitk"}  # shipped with Slicer
    optional = {"isal"}  # faster deflate; zlib writes the same files without it (io.fast_deflate): never blocks
    assert {requirement_name(d) for d in deps} - bundled - optional <= names
    assert not optional & names


# --------------------------------------------------------------------------- defect 7
# Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json (Slicer main): properties, required keys
CATALOG_V101 = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def test_catalog_entry_follows_schema_v1_0_1():
    entry = json.loads((ROOT / "DeepLungReg.json").read_text())
    assert entry["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json#")
    for key in ("$schema", "category", "scm_url"):
        assert key in entry
    for key, value in entry.items():
        assert key in CATALOG_V101, f"{key} is not allowed by schema v1.0.1"
        assert isinstance(value, CATALOG_V101[key]), key
    assert 1 <= entry.get("tier", 1) <= 5
    assert entry["build_dependencies"] == ["PyTorch"]
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in (ROOT / "CMakeLists.txt").read_text()


def test_root_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_bytes()
    # md5 of https://www.apache.org/licenses/LICENSE-2.0.txt
    assert hashlib.md5(text).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


# --------------------------------------------------------------------------- defects 8, 9
def test_results_go_to_the_job_not_to_the_current_selection():
    """Defect 8: _finish and showResults use only the job (nodes and options captured at start)."""
    for fn in (method_node("DeepLungReg", "Widget", "_finish"), method_node("DeepLungReg", "Logic", "showResults")):
        src = ast.unparse(fn)
        assert "_parameterNode" not in src and "p." not in src.replace("job.", ""), src
        assert "job" in src
    prepare = method_node("DeepLungReg", "Logic", "prepareJob")
    assert any(c.endswith(".prepare_job") for c in calls(prepare))
    apply = ast.unparse(method_node("DeepLungReg", "Widget", "onApplyButton"))
    for option in ("p.outputWarped", "p.showJacobian", "p.refine"):
        assert option in apply


def test_new_parameter_node_gets_the_selected_model():
    """Defect 9: after Close Scene the new parameter node must receive the model the selector shows."""
    init = method_node("DeepLungReg", "Widget", "initializeParameterNode")
    assert calls(init)[-1] == "self.refreshModels"
    for handler in ("onSceneEndClose", "enter", "setup"):
        assert "self.initializeParameterNode" in calls(method_node("DeepLungReg", "Widget", handler))
    refresh = method_node("DeepLungReg", "Widget", "refreshModels")
    assert "self.onModelChanged" in calls(refresh)
    assert "self._parameterNode.modelPath =" in ast.unparse(method_node("DeepLungReg", "Widget", "onModelChanged"))


# --------------------------------------------------------------------------- defect 11 (static parts)
def test_gui_process_never_imports_torch():
    for module in MODULES:
        for n in ast.walk(module_tree(module)):
            if isinstance(n, ast.Import):
                assert all(a.name.split(".")[0] != "torch" for a in n.names), module
            if isinstance(n, ast.ImportFrom):
                assert (n.module or "").split(".")[0] != "torch", module
    probe = method_node("DeepLungReg", "Widget", "probeDevices")
    assert "launch" in calls(probe) and "self.logic.deviceProbeCommand" in calls(probe)


def test_self_tests_skip_when_dependencies_are_missing():
    for module in MODULES:
        tree = module_tree(module)
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Test")
        reason = ast.unparse(next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "_skipReason"))
        assert "missing_requirements" in reason and "slicer_version_problem" in reason
        for fn in (f for f in cls.body if isinstance(f, ast.FunctionDef)):
            if fn.name == "runTest" or fn.name.startswith("test_"):
                first = fn.body[0]
                assert "self._skipReason()" in ast.unparse(first), f"{module}Test.{fn.name} must check first"
                check = ast.unparse(fn.body[1])
                expected = "return" if fn.name == "runTest" else "self.skipTest(reason)"
                assert expected in check, f"{module}Test.{fn.name}: {check}"


def test_module_uses_own_launcher_and_no_nonexistent_slicer_api():
    """Defects 2 and 3: toSlicerSafeFileName does not exist in Slicer; children are started
    through DeepLungRegLib.process.launch (own process group, killable as a tree)."""
    for module in MODULES:
        src = (ROOT / module / f"{module}.py").read_text()
        assert "toSlicerSafeFileName" not in src
        assert "launchConsoleProcess" not in src
        assert "launch(" in src


# --------------------------------------------------------------------------- "Also": refine, methods
def test_refine_selector_defaults_to_one_constant():
    from DeepLungRegLib import options
    from DeepLungRegLib.refine_levels import DEFAULT_REFINE, REFINE_CHOICES

    # the module offers exactly the command line's levels and starts on the command line's default
    assert options.REFINE_LEVELS == list(REFINE_CHOICES) == ["off", "fast", "full"]
    assert options.MODULE_DEFAULT_REFINE == DEFAULT_REFINE
    src = (ROOT / "DeepLungReg" / "DeepLungReg.py").read_text()
    assert "refine: Annotated[str, Choice(REFINE_LEVELS)] = MODULE_DEFAULT_REFINE" in src
    assert f'"{DEFAULT_REFINE}"' not in src  # the default is the constant, nowhere else


def test_training_method_choice_comes_from_the_registry():
    src = (ROOT / "DeepLungRegTraining" / "DeepLungRegTraining.py").read_text()
    assert "method: Annotated[str, Choice(METHODS)] = METHODS[0]" in src
    assert "METHODS = method_names()" in src
    assert "method_description" in src


def test_every_shipped_model_is_offered_and_packaged():
    """The Slicer model selector lists the default model first and then every shipped method's model,
    and the extension's CMake resource list installs each of them with its card."""
    from DeepLungRegLib.model_catalog import model_folders, model_label, shipped_model_folders

    folders = model_folders([])
    names = [f.name for f in folders]
    assert names[0] == "default" and {"hering2021", "sokooti2017"} <= set(names)
    assert "hering2021" in model_label(folders[names.index("hering2021")])
    cmake = (ROOT / "DeepLungReg" / "CMakeLists.txt").read_text()
    for folder in shipped_model_folders():
        for f in ("model.safetensors", "README.md"):
            assert f"Models/{folder.name}/{f}" in cmake, f"{folder.name}/{f} is not installed by the extension"
