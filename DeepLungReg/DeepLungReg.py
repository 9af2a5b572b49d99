"""DeepLungReg Slicer module: deep-learning registration of inhale/exhale lung CT.

Thin GUI layer. All node work lives in ``DeepLungRegLib.slicer_logic`` / ``slicer_io``
(tested headless with the slicer-core wheel); the registration itself runs in a child
``PythonSlicer`` process executing the library's command line, so Slicer stays responsive.
Opening the module needs nothing beyond what Slicer ships (models are listed from their file
headers); torch and the other packages are installed, after asking, when Register is pressed,
and only the child process imports them.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Annotated

import qt
import slicer
import vtk
from DeepLungRegLib.dependencies import slicer_version_problem
from DeepLungRegLib.options import DEVICES, MODULE_DEFAULT_REFINE, REFINE_LEVELS
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

USER_MODELS_SETTING = "DeepLungReg/UserModelFolders"
REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")


class DeepLungReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepLungReg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepLungReg developers"]
        self.parent.helpText = _(
            "Deformable registration of inhale (fixed) and exhale (moving) lung CT in seconds with a "
            "trained convolutional network. Produces a grid transform that aligns the moving volume to the "
            "fixed one, a Jacobian-determinant map and, when landmarks are given, target registration errors. "
            "Needs 3D Slicer 5.10 or newer; PyTorch and a few Python packages are installed, after asking, on "
            "the first Register. Research software, not for clinical use.")
        self.parent.acknowledgementText = _(
            "Methods: Eppenhof &amp; Pluim 2018; Eppenhof et al. 2018, 2019; Sokooti et al. 2017; Hering et al. 2021. "
            "Sample data: TCIA CPTAC-LSCC (CC BY 3.0).")


@parameterNodeWrapper
class DeepLungRegParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    device: Annotated[str, Choice(DEVICES)] = "auto"
    refine: Annotated[str, Choice(REFINE_LEVELS)] = MODULE_DEFAULT_REFINE
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
        self._probe = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = slicer_version_problem()
        if problem:  # older Slicer: say what is needed instead of failing later
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
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
        self.initializeParameterNode()
        self.probeDevices()

    def cleanup(self) -> None:
        self.removeObservers()
        self.cancel()

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancel()  # the job's volumes are about to disappear
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        # a new parameter node (first use, after Close Scene) has no model yet: take the selector's
        self.refreshModels()

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

    # ------------------------------------------------------------------ models and devices
    def refreshModels(self) -> None:
        from DeepLungRegLib.model_catalog import model_folders, model_label

        current = self._parameterNode.modelPath if self._parameterNode else ""
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for folder in model_folders(self.logic.userModelFolders()):
            self.ui.modelSelector.addItem(model_label(folder), str(folder))
        index = self.ui.modelSelector.findData(current) if current else -1
        if index < 0 and self.ui.modelSelector.count > 0:
            index = 0
        self.ui.modelSelector.blockSignals(False)
        self.ui.modelSelector.setCurrentIndex(index)
        self.onModelChanged(index)

    def onModelChanged(self, index: int) -> None:
        from DeepLungRegLib.model_catalog import model_summary

        path = self.ui.modelSelector.itemData(index) if index >= 0 else None
        if self._parameterNode and self._parameterNode.modelPath != (path or ""):
            self._parameterNode.modelPath = path or ""
        try:
            self.ui.modelSummaryLabel.text = model_summary(path) if path else _("No model found")
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.ui.modelSummaryLabel.text = _("Unreadable model: {error}").format(error=exc)
        self._checkCanApply()

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder holding model.safetensors"))
        if folder:
            self.logic.addUserModelFolder(folder)
            self.refreshModels()

    def probeDevices(self) -> None:
        """Ask a child Python which devices torch sees (the GUI never imports torch)."""
        from DeepLungRegLib.dependencies import is_satisfied
        from DeepLungRegLib.process import ProcessWatcher, launch

        if not is_satisfied("torch"):
            self.ui.deviceInfoLabel.text = _("PyTorch not installed yet (installed on first Register)")
            return
        try:
            command, env = self.logic.deviceProbeCommand()
            self._probe = ProcessWatcher(launch(command, env))
        except Exception as exc:  # noqa: BLE001 - informative only
            self.ui.deviceInfoLabel.text = str(exc)
            return
        self.ui.deviceInfoLabel.text = _("Checking devices...")
        qt.QTimer.singleShot(500, self._pollProbe)

    def _pollProbe(self) -> None:
        from DeepLungRegLib.device_probe import describe, parse_probe_output

        if self._probe is None:
            return
        _progress, _lines, rc = self._probe.poll()
        if rc is None:
            qt.QTimer.singleShot(500, self._pollProbe)
            return
        probe, self._probe = self._probe, None
        self.ui.deviceInfoLabel.text = describe(parse_probe_output(probe.messages))

    # ------------------------------------------------------------------ run / cancel
    def onApplyButton(self) -> None:
        if self._watcher is not None:
            self.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("Not started: the required Python packages are not installed")
                return
            from DeepLungRegLib.process import ProcessWatcher, launch

            p = self._parameterNode
            withLandmarks = bool(p.fixedLandmarks and p.movingLandmarks)
            self._job = self.logic.prepareJob(
                p.fixedVolume, p.movingVolume, p.modelPath, p.device, p.affine, p.refine, p.outputWarped,
                p.showJacobian, p.fixedLandmarks if withLandmarks else None,
                p.movingLandmarks if withLandmarks else None)
            self._watcher = ProcessWatcher(launch(self._job.command, self._job.environment))
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the registration")
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Registering...")
            qt.QTimer.singleShot(100, self._poll)
        if self._watcher is None and self._probe is None:
            self.probeDevices()  # PyTorch may just have been installed

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
        """Load the results onto the volumes and options the job was started with (held by the job)."""
        from DeepLungRegLib.slicer_logic import summary_lines

        job, self._job = self._job, None
        self.ui.applyButton.text = _("Register")
        self.ui.progressBar.setVisible(False)
        try:
            if rc != 0:
                self.ui.statusLabel.text = _("Registration failed")
                slicer.util.errorDisplay(_("Registration failed:\n{msg}").format(msg="\n".join(errors[-3:]) or rc))
                return
            with slicer.util.tryWithErrorDisplay(_("Could not load the results."), waitCursor=True):
                outputs = self.logic.finishJob(job)
                self.ui.resultsLabel.text = "\n".join(summary_lines(outputs))
                self.ui.statusLabel.text = _("Done")
                self.logic.showResults(outputs, job)
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)
            self._checkCanApply()

    def cancel(self) -> None:
        if self._probe is not None:
            self._probe.kill()
            self._probe = None
        if self._watcher is None:
            return
        self._watcher.kill()
        self._watcher = None
        self.ui.statusLabel.text = _("Cancelled")
        if self._job:
            shutil.rmtree(self._job.folder, ignore_errors=True)
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

    def ensureDependencies(self) -> bool:
        """Checked when Register is pressed, never at import; shared with the Training module."""
        from DeepLungRegLib.dependencies import ensure_in_slicer

        return ensure_in_slicer([REQUIREMENTS], requester="DeepLungReg")

    def deviceProbeCommand(self) -> tuple[list[str], dict]:
        from DeepLungRegLib.slicer_logic import RegistrationLogic, python_for_child

        return RegistrationLogic.child_command(python_for_child(), [], slicer.util.startupEnvironment(),
                                               module="DeepLungRegLib.device_probe")

    def userModelFolders(self) -> list[str]:
        value = qt.QSettings().value(USER_MODELS_SETTING) or []
        return [value] if isinstance(value, str) else list(value)

    def addUserModelFolder(self, folder: str) -> None:
        folders = self.userModelFolders()
        if folder not in folders:
            folders.append(folder)
        qt.QSettings().setValue(USER_MODELS_SETTING, folders)

    def prepareJob(self, fixedVolume, movingVolume, modelPath, device="auto", affine=True,
                   refine=MODULE_DEFAULT_REFINE, outputWarped=True, showJacobian=True, fixedLandmarks=None,
                   movingLandmarks=None):
        """Write the inputs to a temporary folder and build the child-process command (a RegistrationJob)."""
        from DeepLungRegLib.slicer_logic import RegistrationLogic

        return RegistrationLogic(slicer.mrmlScene).prepare_job(
            slicer.app.temporaryPath, fixedVolume, movingVolume, modelPath, device, affine, refine, outputWarped,
            showJacobian, fixedLandmarks, movingLandmarks, base_env=slicer.util.startupEnvironment())

    def finishJob(self, job):
        from DeepLungRegLib.slicer_logic import RegistrationLogic

        return RegistrationLogic(slicer.mrmlScene).finish_job(job)

    def showResults(self, outputs, job) -> None:
        if job.show_jacobian:
            slicer.util.setSliceViewerLayers(background=job.fixed, foreground=outputs.jacobian_node,
                                             foregroundOpacity=0.4)
        else:
            slicer.util.setSliceViewerLayers(background=job.fixed, foreground=job.moving, foregroundOpacity=0.5)
        if outputs.plot_node is not None:
            slicer.modules.plots.logic().ShowChartInLayout(outputs.plot_node)

    def run(self, fixedVolume, movingVolume, modelPath=None, device="cpu", affine=True, fixedLandmarks=None,
            movingLandmarks=None, loadWarped=True, refine=MODULE_DEFAULT_REFINE):
        """Blocking registration in this process (scripting and self-test)."""
        from DeepLungRegLib.slicer_logic import RegistrationLogic

        return RegistrationLogic(slicer.mrmlScene).run(fixedVolume, movingVolume, modelPath, device, affine,
                                                        fixedLandmarks, movingLandmarks, loadWarped, refine)


class DeepLungRegTest(ScriptedLoadableModuleTest):
    """Registers the bundled sample CT against a breathing-like deformed copy with the shipped model."""

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
            return _("DeepLungReg self-test skipped: Python packages not installed: {pkgs}. Press Register once "
                     "to install them, then run the test again.").format(pkgs=", ".join(missing))
        return None

    def runTest(self):
        reason = self._skipReason()
        if reason:
            logging.warning(reason)
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_register_sample_pair()

    def test_register_sample_pair(self):
        reason = self._skipReason()
        if reason:
            self.skipTest(reason)
        import numpy as np
        import SimpleITK as sitk
        from DeepLungRegLib import slicer_io
        from DeepLungRegLib.simulation import BreathingParams, simulate_pair
        from DeepLungRegLib.slicer_logic import sample_ct_path

        self.delayDisplay("Loading the bundled sample CT")
        sample = sample_ct_path()
        sim = simulate_pair(sitk.Cast(sitk.ReadImage(str(sample)), sitk.sitkFloat32), BreathingParams(n_landmarks=50))
        scene = slicer.mrmlScene
        fixed = slicer_io.image_to_volume_node(sim.fixed, scene, "inhale")
        moving = slicer_io.image_to_volume_node(sim.moving, scene, "exhale")
        fm = slicer_io.lps_to_markups(sim.fixed_landmarks, scene, "inhale landmarks")
        mm = slicer_io.lps_to_markups(sim.moving_landmarks, scene, "exhale landmarks")
        self.delayDisplay("Registering")
        outputs = DeepLungRegLogic().run(fixed, moving, None, "cpu", True, fm, mm, refine="off")
        self.assertTrue(outputs.transform_node.IsA("vtkMRMLGridTransformNode"))
        self.assertEqual(moving.GetTransformNodeID(), outputs.transform_node.GetID())
        self.assertEqual(outputs.jacobian_node.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertLess(float(np.mean(outputs.tre["after"])), float(np.mean(outputs.tre["before"])))
        self.assertLess(outputs.report["folding_percent_lung"], 1.0)
        self.delayDisplay("Test passed")
