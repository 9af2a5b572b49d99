"""DeepLungReg Slicer module: deep-learning registration of inhale/exhale lung CT.

Thin GUI layer. All node work lives in ``DeepLungRegLib.slicer_logic`` / ``slicer_io``
(tested headless with the slicer-core wheel); the registration itself runs in a child
``PythonSlicer`` process executing the library's command line, so Slicer stays responsive.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

REQUIRED_MODULES = {"torch": "torch", "skimage": "scikit-image", "scipy": "scipy", "safetensors": "safetensors",
                    "tqdm": "tqdm", "SimpleITK": "SimpleITK"}
USER_MODELS_SETTING = "DeepLungReg/UserModelFolders"


class DeepLungReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepLungReg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepLungReg developers"]
        self.parent.helpText = _(
            "Deformable registration of inhale (fixed) and exhale (moving) lung CT in seconds with a "
            "trained convolutional network (Eppenhof &amp; Pluim, IEEE TMI 2018). Produces a grid transform "
            "that aligns the moving volume to the fixed one, a Jacobian-determinant map and, when landmarks "
            "are given, target registration errors. Research software, not for clinical use.")
        self.parent.acknowledgementText = _(
            "Methods: Eppenhof &amp; Pluim 2018; Eppenhof et al. 2018, 2019; Sokooti et al. 2017; Hering et al. 2021. "
            "Sample data: TCIA CPTAC-LSCC (CC BY 3.0).")


@parameterNodeWrapper
class DeepLungRegParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    affine: bool = True
    outputWarped: bool = True
    showJacobian: bool = True
    modelPath: str = ""


class DeepLungRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._watcher = None
        self._job = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepLungReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepLungRegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.progressBar.setVisible(False)
        self.ui.deviceInfoLabel.text = self.logic.deviceDescription()
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshModels()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._watcher is not None:
            return
        p = self._parameterNode
        ok = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume and p.modelPath)
        self.ui.applyButton.enabled = ok
        self.ui.applyButton.toolTip = _("Register the moving volume to the fixed volume") if ok else _(
            "Select two different volumes and a model")

    # ------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        from DeepLungRegLib.slicer_logic import model_folders

        current = self._parameterNode.modelPath if self._parameterNode else ""
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for folder in model_folders(self.logic.userModelFolders()):
            self.ui.modelSelector.addItem(folder.name if folder.name != "default" else _("default (shipped)"),
                                          str(folder))
        index = max(self.ui.modelSelector.findData(current), 0) if current else 0
        self.ui.modelSelector.blockSignals(False)
        self.ui.modelSelector.setCurrentIndex(index)
        self.onModelChanged(index)

    def onModelChanged(self, index: int) -> None:
        from DeepLungRegLib.slicer_logic import model_summary

        path = self.ui.modelSelector.itemData(index) if index >= 0 else None
        if self._parameterNode:
            self._parameterNode.modelPath = path or ""
        try:
            self.ui.modelSummaryLabel.text = model_summary(path) if path else _("No model found")
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.ui.modelSummaryLabel.text = _("Unreadable model: {error}").format(error=exc)

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder holding model.safetensors"))
        if folder:
            self.logic.addUserModelFolder(folder)
            self.refreshModels()

    # ------------------------------------------------------------------ run / cancel
    def onApplyButton(self) -> None:
        if self._watcher is not None:
            self.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            from DeepLungRegLib.process import ProcessWatcher

            p = self._parameterNode
            landmarks = (p.fixedLandmarks, p.movingLandmarks) if p.fixedLandmarks and p.movingLandmarks else (None, None)
            self._job = self.logic.prepareJob(p.fixedVolume, p.movingVolume, p.modelPath, p.device, p.affine,
                                              *landmarks)
            process = slicer.util.launchConsoleProcess(self._job["command"], updateEnvironment=self._job["environment"])
            self._watcher = ProcessWatcher(process)
            self.ui.applyButton.text = _("Cancel")
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Registering...")
            qt.QTimer.singleShot(100, self._poll)

    def _poll(self) -> None:
        if self._watcher is None:
            return
        progress, lines, rc = self._watcher.poll()
        if progress:
            self.ui.progressBar.setValue(progress[-1].percent)
            self.ui.statusLabel.text = _("Stage: {stage}").format(stage=progress[-1].text)
        for line in lines:
            logging.info(line)
        if rc is None:
            qt.QTimer.singleShot(200, self._poll)
            return
        watcher, self._watcher = self._watcher, None
        self._finish(rc, watcher.errors())

    def _finish(self, rc: int, errors: list[str]) -> None:
        from DeepLungRegLib.slicer_logic import summary_lines

        job, self._job = self._job, None
        self.ui.applyButton.text = _("Register")
        self.ui.progressBar.setVisible(False)
        try:
            if rc != 0:
                self.ui.statusLabel.text = _("Registration failed")
                slicer.util.errorDisplay(_("Registration failed:\n{msg}").format(msg="\n".join(errors[-3:]) or rc))
                return
            p = self._parameterNode
            with slicer.util.tryWithErrorDisplay(_("Could not load the results."), waitCursor=True):
                outputs = self.logic.loadJob(job, p.outputWarped)
                self.ui.resultsLabel.text = "\n".join(summary_lines(outputs))
                self.ui.statusLabel.text = _("Done")
                self.logic.showResults(outputs, p.fixedVolume, p.movingVolume, p.showJacobian)
        finally:
            shutil.rmtree(job["folder"], ignore_errors=True)
            self._checkCanApply()

    def cancel(self) -> None:
        if self._watcher is None:
            return
        self._watcher.kill()
        self._watcher = None
        self.ui.statusLabel.text = _("Cancelled")
        if self._job:
            shutil.rmtree(self._job["folder"], ignore_errors=True)
            self._job = None
        self.ui.applyButton.text = _("Register")
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()


class DeepLungRegLogic(ScriptedLoadableModuleLogic):
    """Slicer-facing logic; the node work is delegated to ``DeepLungRegLib.slicer_logic``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepLungRegParameterNode(super().getParameterNode())

    # dependencies are checked when Register is pressed, never at import
    def ensureDependencies(self) -> bool:
        import importlib.util

        missing = [pkg for mod, pkg in REQUIRED_MODULES.items() if importlib.util.find_spec(mod) is None]
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("DeepLungReg needs these Python packages: {pkgs}.\nInstall them now? This can take several "
                  "minutes and needs an internet connection.").format(pkgs=", ".join(missing))):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils  # from the PyTorch extension: picks the right CUDA/CPU build

                torch_logic = PyTorchUtils.PyTorchUtilsLogic()
                if not torch_logic.torchInstalled():
                    torch_logic.installTorch(askConfirmation=False)
                missing.remove("torch")
            except ImportError:
                pass
        if missing:
            slicer.util.pip_install(" ".join(missing))
        return True

    def deviceDescription(self) -> str:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return _("PyTorch not installed yet (installed on first use)")
        import torch

        if torch.cuda.is_available():
            return _("GPU: {name}").format(name=torch.cuda.get_device_name(0))
        return _("No CUDA GPU detected: CPU")

    def userModelFolders(self) -> list[str]:
        value = qt.QSettings().value(USER_MODELS_SETTING) or []
        return [value] if isinstance(value, str) else list(value)

    def addUserModelFolder(self, folder: str) -> None:
        folders = self.userModelFolders()
        if folder not in folders:
            folders.append(folder)
        qt.QSettings().setValue(USER_MODELS_SETTING, folders)

    def prepareJob(self, fixedVolume, movingVolume, modelPath, device="auto", affine=True,
                   fixedLandmarks=None, movingLandmarks=None) -> dict:
        """Write the inputs to a temporary folder and build the child-process command."""
        from DeepLungRegLib.slicer_logic import RegistrationLogic, python_for_child

        folder = Path(tempfile.mkdtemp(prefix="DeepLungReg-", dir=slicer.app.temporaryPath))
        core = RegistrationLogic(slicer.mrmlScene)
        inputs = core.write_inputs(folder, fixedVolume, movingVolume, fixedLandmarks, movingLandmarks)
        args = core.command_args(inputs, folder / "out", modelPath, device, affine)
        command, env = core.child_command(python_for_child(), args)
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        return {"folder": folder, "command": command, "environment": changed, "fixed": fixedVolume,
                "moving": movingVolume, "fixedLandmarks": fixedLandmarks, "movingLandmarks": movingLandmarks}

    def loadJob(self, job: dict, loadWarped: bool = True):
        from DeepLungRegLib.slicer_logic import RegistrationLogic

        return RegistrationLogic(slicer.mrmlScene).load_results(
            job["folder"] / "out", job["fixed"], job["moving"], job["fixedLandmarks"], job["movingLandmarks"],
            loadWarped)

    def showResults(self, outputs, fixedVolume, movingVolume, showJacobian: bool = True) -> None:
        movingVolume.SetAndObserveTransformNodeID(outputs.transform_node.GetID())
        if showJacobian:
            slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=outputs.jacobian_node,
                                             foregroundOpacity=0.4)
        else:
            slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=movingVolume,
                                             foregroundOpacity=0.5)
        if outputs.plot_node is not None:
            slicer.modules.plots.logic().ShowChartInLayout(outputs.plot_node)

    def run(self, fixedVolume, movingVolume, modelPath=None, device="cpu", affine=True, fixedLandmarks=None,
            movingLandmarks=None, loadWarped=True):
        """Blocking registration in this process (scripting and self-test)."""
        from DeepLungRegLib.slicer_logic import RegistrationLogic

        return RegistrationLogic(slicer.mrmlScene).run(fixedVolume, movingVolume, modelPath, device, affine,
                                                        fixedLandmarks, movingLandmarks, loadWarped)


class DeepLungRegTest(ScriptedLoadableModuleTest):
    """Registers the bundled sample CT against a breathing-like deformed copy with the shipped model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_register_sample_pair()

    def test_register_sample_pair(self):
        import numpy as np
        import SimpleITK as sitk
        from DeepLungRegLib import slicer_io
        from DeepLungRegLib.simulation import BreathingParams, simulate_pair

        self.delayDisplay("Loading the bundled sample CT")
        from DeepLungRegLib.slicer_logic import sample_ct_path

        sample = sample_ct_path()
        sim = simulate_pair(sitk.Cast(sitk.ReadImage(str(sample)), sitk.sitkFloat32), BreathingParams(n_landmarks=50))
        scene = slicer.mrmlScene
        fixed = slicer_io.image_to_volume_node(sim.fixed, scene, "inhale")
        moving = slicer_io.image_to_volume_node(sim.moving, scene, "exhale")
        fm = slicer_io.lps_to_markups(sim.fixed_landmarks, scene, "inhale landmarks")
        mm = slicer_io.lps_to_markups(sim.moving_landmarks, scene, "exhale landmarks")
        self.delayDisplay("Registering")
        outputs = DeepLungRegLogic().run(fixed, moving, None, "cpu", True, fm, mm)
        self.assertTrue(outputs.transform_node.IsA("vtkMRMLGridTransformNode"))
        self.assertEqual(outputs.jacobian_node.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertLess(float(np.mean(outputs.tre["after"])), float(np.mean(outputs.tre["before"])))
        self.assertLess(outputs.report["folding_percent_lung"], 1.0)
        self.delayDisplay("Test passed")
