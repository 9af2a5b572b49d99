"""DeepLungRegTraining Slicer module: train a registration network on your own scans.

Thin GUI layer over ``deeplungreg train`` (``DeepLungRegTrainingLib``), run in a child
``PythonSlicer`` process: progress bar, live loss and validation error, Cancel, resume.
The trained model folder is added to the DeepLungReg module's model selector.
Headless use needs no Slicer GUI at all: ``deeplungreg train ...`` (see the README).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from DeepLungRegLib.dependencies import slicer_version_problem
from DeepLungRegLib.options import DEVICES
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # the method registry (torch-free); on a too old Python the widget shows the version message instead
    from DeepLungRegLib.methods import method_names

    METHODS = method_names()
except (ImportError, SyntaxError):
    METHODS = ["eppenhof2018"]

USER_MODELS_SETTING = "DeepLungReg/UserModelFolders"
REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")


def _isSet(path) -> bool:
    """An empty ctkPathLineEdit reads as Path('') == Path('.')."""
    return path is not None and str(path) not in ("", ".")


class DeepLungRegTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepLungReg Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["DeepLungReg"]  # its library (DeepLungRegLib) is used here
        self.parent.contributors = ["DeepLungReg developers"]
        self.parent.helpText = _(
            "Train a lung CT registration network from synthetic deformations of your own scans. "
            "Long runs can be cancelled and resumed. Needs 3D Slicer 5.10 or newer; PyTorch and a few Python "
            "packages are installed, after asking, on the first Start.")
        self.parent.acknowledgementText = _("Methods: see the DeepLungReg module.")


@parameterNodeWrapper
class DeepLungRegTrainingParameterNode:
    validationVolume: vtkMRMLScalarVolumeNode
    imagesFolder: Path  # ctkPathLineEdit binds to pathlib.Path (empty: none)
    outputFolder: Path
    method: Annotated[str, Choice(METHODS)] = METHODS[0]
    grid: Annotated[str, Choice(["32", "64", "96", "128"])] = "64"
    iterations: Annotated[int, WithinRange(10, 1000000)] = 10000
    device: Annotated[str, Choice(DEVICES)] = "auto"
    resume: bool = False


class DeepLungRegTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._watcher = None
        self._startedAt = None
        self._outputFolder = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = slicer_version_problem()
        if problem:  # older Slicer: say what is needed instead of failing later
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepLungRegTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepLungRegTrainingLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._watcher is not None:
            self._watcher.kill()
            self._watcher = None

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanStart)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanStart)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanStart)
            self._checkCanStart()
            self.onMethodChanged()

    def _checkCanStart(self, caller=None, event=None) -> None:
        if self._watcher is None:
            p = self._parameterNode
            self.ui.startButton.enabled = bool(p and _isSet(p.outputFolder))

    def onMethodChanged(self, index=None) -> None:
        from DeepLungRegLib.model_catalog import method_description

        p = self._parameterNode
        self.ui.methodInfoLabel.text = method_description(p.method) if p else ""

    def onStartButton(self) -> None:
        if self._watcher is not None:
            self._watcher.kill()
            self._watcher = None
            self.ui.statusLabel.text = _("Cancelled: tick 'Resume' and start again to continue")
            self.ui.startButton.text = _("Start training")
            self.ui.progressBar.setVisible(False)
            self._checkCanStart()
            return
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("Not started: the required Python packages are not installed")
                return
            from DeepLungRegLib.process import ProcessWatcher, launch

            p = self._parameterNode
            volumes = list(self.ui.trainingVolumesSelector.checkedNodes())
            command, env = self.logic.prepare(volumes, p.imagesFolder, p.validationVolume, p.outputFolder,
                                              p.method, int(p.grid), p.iterations, p.device, p.resume)
            self._startedAt = time.time()
            self._outputFolder = str(p.outputFolder)
            self._watcher = ProcessWatcher(launch(command, env))
            self.ui.startButton.text = _("Cancel")
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Preparing scans...")
            qt.QTimer.singleShot(500, self._poll)

    def _poll(self) -> None:
        from DeepLungRegLib.slicer_logic import training_outcome

        if self._watcher is None:
            return
        progress, lines, rc = self._watcher.poll()
        if progress:
            self.ui.progressBar.setValue(progress[-1].percent)
            self.ui.statusLabel.text = f"{progress[-1].done}/{progress[-1].total} {progress[-1].text}"
        for line in lines:
            self.ui.logText.appendPlainText(line)
            logging.info(line)
        if rc is None:
            qt.QTimer.singleShot(1000, self._poll)
            return
        self._watcher = None
        self.ui.startButton.text = _("Start training")
        self.ui.progressBar.setVisible(False)
        outcome = training_outcome(rc, self._outputFolder, self._startedAt)
        if outcome != "failed":
            self.logic.registerModelFolder(self._outputFolder)
        if outcome == "done":
            self.ui.statusLabel.text = _("Done: the model is listed in the DeepLungReg module")
        elif outcome == "model-written":
            self.ui.statusLabel.text = _("The model was written and is listed in the DeepLungReg module, but a "
                                         "later step failed (exit code {rc}); see the log").format(rc=rc)
        else:
            self.ui.statusLabel.text = _("Training failed (exit code {rc}); see the log").format(rc=rc)
        self._checkCanStart()


class DeepLungRegTrainingLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepLungRegTrainingParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> bool:
        """The same dependency step as the DeepLungReg module (Start pressed, never at import)."""
        from DeepLungRegLib.dependencies import ensure_in_slicer

        return ensure_in_slicer([REQUIREMENTS], requester="DeepLungReg Training")

    def prepare(self, volumes, imagesFolder, validationVolume, outputFolder, method, grid, iterations, device,
                resume) -> tuple[list[str], dict]:
        """Write the selected volume nodes into OUTPUT/inputs (one file per node, rewritten on every
        start so a resumed run sees the nodes' current content) and build the command."""
        from DeepLungRegLib.slicer_logic import (
            RegistrationLogic,
            python_for_child,
            training_command_args,
            write_training_inputs,
        )

        if not _isSet(outputFolder):
            raise ValueError(_("Choose a model folder"))
        out = Path(outputFolder)
        images = write_training_inputs(volumes, out / "inputs")
        if _isSet(imagesFolder):
            images.append(Path(imagesFolder))
        if not images:
            raise ValueError(_("Choose training volumes and/or a folder of scans"))
        validation = None
        if validationVolume is not None:
            validation = write_training_inputs([validationVolume], out / "inputs" / "validation")[0]
        args = training_command_args(images, out, method, grid, iterations, device, resume, validation)
        return RegistrationLogic.child_command(python_for_child(), args, slicer.util.startupEnvironment())

    def registerModelFolder(self, folder: str) -> None:
        settings = qt.QSettings()
        value = settings.value(USER_MODELS_SETTING) or []
        folders = [value] if isinstance(value, str) else list(value)
        if folder not in folders:
            folders.append(folder)
        settings.setValue(USER_MODELS_SETTING, folders)


class DeepLungRegTrainingTest(ScriptedLoadableModuleTest):
    """A few training iterations on the bundled sample at 32³; checks that a readable model appears."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def _skipReason(self):
        """Why the test cannot run here (old Slicer, packages not installed), or None."""
        from DeepLungRegLib.dependencies import missing_requirements, read_requirements

        problem = slicer_version_problem()
        if problem:
            return problem
        missing = missing_requirements(read_requirements(REQUIREMENTS))
        if missing:
            return _("DeepLungReg Training self-test skipped: Python packages not installed: {pkgs}. Press Start "
                     "training once to install them, then run the test again.").format(pkgs=", ".join(missing))
        return None

    def runTest(self):
        reason = self._skipReason()
        if reason:
            logging.warning(reason)
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_short_training()

    def test_short_training(self):
        reason = self._skipReason()
        if reason:
            self.skipTest(reason)
        import tempfile

        from DeepLungRegLib.model_catalog import read_header_metadata
        from DeepLungRegLib.slicer_logic import sample_ct_path
        from DeepLungRegTrainingLib.training import TrainConfig, train

        sample = sample_ct_path()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(grid=32, width=4, depth=3, iterations=10, validate_every=10, validation_pairs=1,
                              snapshot_every=5, average_last=2, workers=0, device="cpu")
            result = train([sample], tmp, cfg, progress=False)
            self.assertEqual(read_header_metadata(result.model_path)["grid_size"], 32)
        self.delayDisplay("Test passed")
