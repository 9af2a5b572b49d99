"""DeepLungRegTraining Slicer module: train a registration network on your own scans.

Thin GUI layer over ``deeplungreg train`` (``DeepLungRegTrainingLib``), run in a child
``PythonSlicer`` process: progress bar, live loss and validation error, Cancel, resume.
The trained model folder is added to the DeepLungReg module's model selector.
Headless use needs no Slicer GUI at all: ``deeplungreg train ...`` (see the README).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
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

USER_MODELS_SETTING = "DeepLungReg/UserModelFolders"


def _isSet(path) -> bool:
    """An empty ctkPathLineEdit reads as Path('') == Path('.')."""
    return path is not None and str(path) not in ("", ".")


class DeepLungRegTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepLungReg Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepLungReg developers"]
        self.parent.helpText = _(
            "Train a lung CT registration network from synthetic deformations of your own scans "
            "(Eppenhof &amp; Pluim, IEEE TMI 2018). Long runs can be cancelled and resumed.")
        self.parent.acknowledgementText = _("Method: Eppenhof &amp; Pluim 2018.")


@parameterNodeWrapper
class DeepLungRegTrainingParameterNode:
    validationVolume: vtkMRMLScalarVolumeNode
    imagesFolder: Path  # ctkPathLineEdit binds to pathlib.Path (empty: none)
    outputFolder: Path
    method: Annotated[str, Choice(["eppenhof2018"])] = "eppenhof2018"
    grid: Annotated[str, Choice(["32", "64", "96", "128"])] = "64"
    iterations: Annotated[int, WithinRange(10, 1000000)] = 10000
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    resume: bool = False


class DeepLungRegTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._watcher = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepLungRegTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepLungRegTrainingLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._watcher is not None:
            self._watcher.kill()

    def enter(self) -> None:
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

    def _checkCanStart(self, caller=None, event=None) -> None:
        if self._watcher is None:
            p = self._parameterNode
            self.ui.startButton.enabled = bool(p and _isSet(p.outputFolder))

    def onStartButton(self) -> None:
        if self._watcher is not None:
            self._watcher.kill()
            self._watcher = None
            self.ui.statusLabel.text = _("Cancelled: tick 'Resume' and start again to continue")
            self.ui.startButton.text = _("Start training")
            self.ui.progressBar.setVisible(False)
            return
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            from DeepLungRegLib.process import ProcessWatcher

            p = self._parameterNode
            volumes = list(self.ui.trainingVolumesSelector.checkedNodes())
            command, env = self.logic.prepare(volumes, p.imagesFolder, p.validationVolume, p.outputFolder,
                                              p.method, int(p.grid), p.iterations, p.device, p.resume)
            self._watcher = ProcessWatcher(slicer.util.launchConsoleProcess(command, updateEnvironment=env))
            self.ui.startButton.text = _("Cancel")
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Preparing scans...")
            qt.QTimer.singleShot(500, self._poll)

    def _poll(self) -> None:
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
        if rc == 0:
            self.logic.registerModelFolder(str(self._parameterNode.outputFolder))
            self.ui.statusLabel.text = _("Done: the model is listed in the DeepLungReg module")
        else:
            self.ui.statusLabel.text = _("Training failed (exit code {rc}); see the log").format(rc=rc)


class DeepLungRegTrainingLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepLungRegTrainingParameterNode(super().getParameterNode())

    def prepare(self, volumes, imagesFolder, validationVolume, outputFolder, method, grid, iterations, device,
                resume) -> tuple[list[str], dict]:
        """Write selected volume nodes into OUTPUT/inputs (kept for resume) and build the command."""
        import SimpleITK as sitk
        from DeepLungRegLib import slicer_io
        from DeepLungRegLib.slicer_logic import RegistrationLogic, python_for_child

        out = Path(outputFolder)
        inputs = out / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        images = []
        for node in volumes:
            path = inputs / f"{slicer.app.toSlicerSafeFileName(node.GetName())}.nrrd"
            if not (resume and path.exists()):
                sitk.WriteImage(slicer_io.volume_node_to_image(node), str(path))
            images.append(str(path))
        if _isSet(imagesFolder):
            images.append(str(imagesFolder))
        if not images:
            raise ValueError(_("Choose training volumes and/or a folder of scans"))
        args = ["train", "--images", *images, "-o", str(out), "--method", method, "--grid", str(grid),
                "--iterations", str(iterations), "--device", device, "--quiet", "--progress-lines"]
        if validationVolume is not None:
            vpath = inputs / "validation.nrrd"
            sitk.WriteImage(slicer_io.volume_node_to_image(validationVolume), str(vpath))
            args += ["--validation-image", str(vpath)]
        if resume:
            args.append("--resume")
        command, env = RegistrationLogic.child_command(python_for_child(), args)
        return command, {k: env[k] for k in ("PYTHONPATH", "PYTHONUNBUFFERED")}

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

    def runTest(self):
        self.setUp()
        self.test_short_training()

    def test_short_training(self):
        import tempfile

        from DeepLungRegLib.modelfile import read_metadata
        from DeepLungRegLib.slicer_logic import sample_ct_path
        from DeepLungRegTrainingLib.training import TrainConfig, train

        sample = sample_ct_path()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(grid=32, width=4, depth=3, iterations=10, validate_every=10, validation_pairs=1,
                              snapshot_every=5, average_last=2, workers=0, device="cpu")
            result = train([sample], tmp, cfg, progress=False)
            self.assertEqual(read_metadata(result.model_path)["grid_size"], 32)
        self.delayDisplay("Test passed")
