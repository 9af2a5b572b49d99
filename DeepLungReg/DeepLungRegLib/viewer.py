"""``deeplungreg view OUTDIR``: a registration reviewed in the browser with Slicer's own slice views.

A trame-slicer application (Kitware): slicer-core MRML scenes and slice views rendered on the server
(VTK; headless through EGL), streamed to the page as images; wheel, drag and keys in a view go back to
Slicer's own interaction. Nine slice views, one row per orientation (axial, coronal, sagittal), one
column per image: the fixed image, the warped moving image and their difference; views of one row show
the same slice (scrolling one moves the others). The Jacobian determinant is an overlay, masked to the
lung, on one column (diverging colours centred at 1 on a log scale, folding in lime; opacity and range
controls); landmarks, when given, are markers coloured by their TRE, with a table whose rows jump to
their landmark.

What is shown comes from :mod:`DeepLungRegLib.viewer_data` (what ``register`` wrote). trame and slicer are
imported inside this module's functions only, so the rest of the library never needs them. Binds to
127.0.0.1 by default; the page loads nothing from outside the server.
"""

from __future__ import annotations

import ctypes.util
import errno
import os
import socket
import sys
from pathlib import Path

import numpy as np

from .errors import InputError
from .qa import HU_WINDOW, JACOBIAN_RANGE
from .viewer_data import TRE_BIN_COLORS, TRE_BIN_EDGES_MM, ViewerData, jacobian_colors, load, resolve_output

#: Columns of the page: (key, title). View ids are ``<column>_<orientation>`` (plain identifiers).
COLUMNS = (("fixed", "Fixed"), ("warped", "Warped moving"), ("difference", "Fixed \u2212 warped"))
ORIENTATIONS = ("axial", "coronal", "sagittal")
ORIENTATION_COLORS = {"axial": "#F34A33", "coronal": "#6DAD4A", "sagittal": "#EFD64D"}
RAS_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
#: CT display windows (min, max HU); the first is the QA picture's.
CT_WINDOWS = {"QA picture": HU_WINDOW, "lung": (-1350.0, 150.0), "soft tissue": (-160.0, 240.0)}
DEFAULT_PORT = 8080
VIEWER_REQUIREMENTS = "trame-slicer==2.0.0 slicer-layer-dm==2.0.0 slicer-core==5.11.0.6 vtk==9.6.0"


def view_id(column: str, orientation: str) -> str:
    return f"{column}_{orientation}"


# --------------------------------------------------------------------------- labels
def tre_bin_label(i: int) -> str:
    edges = (0.0,) + TRE_BIN_EDGES_MM
    return f"\u2265 {edges[i]:g} mm" if i == len(TRE_BIN_EDGES_MM) else f"{edges[i]:g}\u2013{edges[i + 1]:g} mm"


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgb)


# --------------------------------------------------------------------------- checks before any work
def check_dependencies() -> None:
    """A clear error when the viewer's packages are missing (they are an optional part of the set-up)."""
    try:
        import slicer
        import trame  # noqa: F401
        import trame_slicer  # noqa: F401
        import trame_vuetify  # noqa: F401
    except ImportError as exc:
        raise InputError(f"'view' needs the viewer packages ({exc}); install them with "
                         f"pip install {VIEWER_REQUIREMENTS} (scripts/setup_env.sh does)") from None
    if not hasattr(slicer, "vtkMRMLLayerDMObjectEventObserverScripted"):
        raise InputError(f"'view' needs slicer-layer-dm next to slicer-core (this slicer-core has no layered "
                         f"displayable managers); install {VIEWER_REQUIREMENTS}")


def check_port(host: str, port: int) -> None:
    """Refuse a port already in use on ``host`` (before loading anything)."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: not a port number (0..65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InputError(f"port {port} on {host} is already in use; choose another with --port") from None
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror})") from None


def _use_egl_when_headless() -> None:
    """Render without a display through EGL (Mesa's software renderer where there is no GPU)."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("VTK_DEFAULT_OPENGL_WINDOW"):
        return
    if not ctypes.util.find_library("EGL"):
        raise InputError("no display and no EGL library to render the views headless; install libEGL with "
                         "Mesa (Debian/Ubuntu: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri)")
    os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"


# --------------------------------------------------------------------------- the application
class RegistrationViewer:
    """The Slicer scene, the nine views and the page of one registration output."""

    def __init__(self, data: ViewerData, server=None) -> None:
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        self.data = data
        self.server = server or get_server(None, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.app = SlicerApp()
        self.scene = self.app.scene
        register_rca_factories(self.app.view_manager, self.server, slice_view_ui_f=self._view_overlay_ui,
                               target_fps=20.0, blur_fps=20.0)
        self._init_state()
        self._load_scene()
        data.fixed = data.warped = data.difference = data.jacobian = None  # the scene holds copies
        self._create_views()
        self._build_ui()
        self._bind_state()

    # ----------------------------------------------------------------- scene
    def _init_state(self) -> None:
        d, s = self.data, self.state
        s.trame__title = f"DeepLungReg \u2013 {d.title}"
        s.ct_window = next(iter(CT_WINDOWS))
        s.jac_show = True
        s.jac_column = "fixed"
        s.jac_opacity = 0.8
        s.jac_range = list(JACOBIAN_RANGE)
        s.jac_lung_range = [round(v, 3) for v in d.jacobian_lung_range]
        s.diff_window = 500
        s.lm_show = d.landmarks is not None
        s.lm_selected = -1
        s.lm_rows = self._landmark_rows()
        s.lm_legend = self._landmark_legend()
        s.notes = list(d.notes)
        s.summary = self._summary()
        s.slice_positions = {}

    def _summary(self) -> list[str]:
        r = self.data.report
        out = []
        tre = r.get("tre_mm")
        if tre:
            out.append(f"TRE {tre['before']['mean']:.2f} \u2192 {tre['after']['mean']:.2f} mm "
                       f"(p95 {tre['after']['p95']:.2f}, n = {tre['after'].get('n', '?')})")
        if "folding_percent_lung" in r:
            out.append(f"folding {r['folding_percent_lung']:.4f} % of the lung")
        if "jacobian_min" in r and "jacobian_max" in r:
            out.append(f"det J {r['jacobian_min']:.2f} .. {r['jacobian_max']:.2f}")
        model = r.get("model") or {}
        if model.get("method"):
            out.append(f"{model['method']}, refine {r.get('refine_level', '?')}"
                       + (" (untrained model)" if model.get("untrained") else ""))
        return out

    def _landmark_rows(self) -> list[dict]:
        lm = self.data.landmarks
        if lm is None:
            return []
        bins = lm.bins()
        order = np.argsort(-lm.tre_after, kind="stable")
        return [{"i": int(i), "label": f"{i + 1}", "before": round(float(lm.tre_before[i]), 2),
                 "after": round(float(lm.tre_after[i]), 2), "color": _hex(TRE_BIN_COLORS[bins[i]])} for i in order]

    def _landmark_legend(self) -> list[dict]:
        lm = self.data.landmarks
        if lm is None:
            return []
        counts = np.bincount(lm.bins(), minlength=len(TRE_BIN_COLORS))
        return [{"label": tre_bin_label(i), "color": _hex(c), "count": int(counts[i])}
                for i, c in enumerate(TRE_BIN_COLORS)]

    def _load_scene(self) -> None:
        from . import slicer_io

        d, scene = self.data, self.scene
        self.volumes = {
            "fixed": slicer_io.image_to_volume_node(d.fixed, scene, "fixed"),
            "warped": slicer_io.image_to_volume_node(d.warped, scene, "warped_moving"),
            "difference": slicer_io.image_to_volume_node(d.difference, scene, "difference"),
        }
        # a label volume: its layer honours the colour table's opacity (transparent at det 1)
        self.jacobian = slicer_io.image_to_volume_node(
            d.jacobian, scene, "jacobian", node=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "jacobian"))
        self.jacobian_colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "jacobian_colors")
        self.jacobian_colors.SetTypeToUser()
        self._update_jacobian_colors()
        self.jacobian.GetDisplayNode().SetAndObserveColorNodeID(self.jacobian_colors.GetID())
        self._update_ct_window()
        self._update_difference_window()
        self.markups = []
        lm = d.landmarks
        if lm is not None:
            bins = lm.bins()
            for b, rgb in enumerate(TRE_BIN_COLORS):
                idx = np.flatnonzero(bins == b)
                if not len(idx):
                    continue
                node = slicer_io.lps_to_markups(lm.fixed[idx], scene, f"tre_{b}", labels=[str(i + 1) for i in idx])
                node.CreateDefaultDisplayNodes()
                node.SetLocked(1)
                md = node.GetDisplayNode()
                md.SetSelectedColor(*rgb)
                md.SetColor(*rgb)
                md.SetActiveColor(*rgb)
                md.SetGlyphScale(2.5)
                md.SetTextScale(2.5)
                md.SetOpacity(1.0)
                md.SetPropertiesLabelVisibility(False)
                self.markups.append(node)

    def _update_jacobian_colors(self) -> None:
        lo, hi = (float(v) for v in self.state.jac_range)
        lo, hi = min(max(lo, 0.05), 0.99), max(min(hi, 20.0), 1.01)
        rgba = jacobian_colors(lo, hi)
        c = self.jacobian_colors
        lut = c.GetLookupTable()
        c.SetNumberOfColors(len(rgba))
        lut.SetNumberOfTableValues(len(rgba))
        for i, (r, g, b, a) in enumerate(rgba):
            lut.SetTableValue(i, r, g, b, a)
        lut.SetTableRange(0, len(rgba) - 1)
        c.Modified()

    def _update_ct_window(self) -> None:
        lo, hi = CT_WINDOWS.get(self.state.ct_window, next(iter(CT_WINDOWS.values())))
        for key in ("fixed", "warped"):
            disp = self.volumes[key].GetDisplayNode()
            disp.AutoWindowLevelOff()
            disp.SetWindowLevelMinMax(lo, hi)

    def _update_difference_window(self) -> None:
        w = max(float(self.state.diff_window), 10.0)
        disp = self.volumes["difference"].GetDisplayNode()
        disp.AutoWindowLevelOff()
        disp.SetWindowLevelMinMax(-w, w)

    # ----------------------------------------------------------------- views
    def _create_views(self) -> None:
        import vtk
        from trame_slicer.views import ViewLayoutDefinition

        vm = self.app.view_manager
        self.views = {}
        warnings = vtk.vtkObject.GetGlobalWarningDisplay()
        vtk.vtkObject.GlobalWarningDisplayOff()  # trame-slicer 2.0 observes a deprecated interactor event
        try:
            for orientation in ORIENTATIONS:
                for column, _ in COLUMNS:
                    vid = view_id(column, orientation)
                    self.views[vid] = vm.create_view(ViewLayoutDefinition.slice_view(
                        orientation.title(), label=vid, color=ORIENTATION_COLORS[orientation]))
        finally:
            vtk.vtkObject.SetGlobalWarningDisplay(warnings)
        vm.set_current_view_ids(list(self.views))
        self._syncing = False
        for vid, view in self.views.items():
            column = vid.split("_")[0]
            view.set_background_volume_id(self.volumes[column].GetID())
            composite = view._logic.GetSliceCompositeNode()
            composite.SetLinkedControl(1)
            view.get_view_node().SetOrientationMarkerType(0)
            view.get_view_node().AddObserver("ModifiedEvent", lambda node, _e, vid=vid: self._on_slice_modified(vid))
        self._fit_views()
        self._update_overlay()

    def _fit_views(self) -> None:
        """Whole images in view, slices through the lungs (the sagittal ones through the right lung)."""
        self._syncing = True
        try:
            for vid, view in self.views.items():
                view.fit_view_to_content()
                lps = self.data.sagittal_center if vid.endswith("_sagittal") else self.data.lung_center
                view.get_view_node().JumpSliceByOffsetting(-float(lps[0]), -float(lps[1]), float(lps[2]))
        finally:
            self._syncing = False
        self._publish_offsets()

    def _on_slice_modified(self, vid: str) -> None:
        """Keep the views of one orientation on one slice (whatever moved it: wheel, slider, keys)."""
        if self._syncing:
            return
        src = self.views[vid]
        orientation = vid.split("_", 1)[1]
        offset = src.get_slice_value()
        self._syncing = True
        try:
            for other, view in self.views.items():
                if other != vid and other.endswith("_" + orientation) and abs(view.get_slice_value() - offset) > 1e-6:
                    view.set_slice_value(offset)
        finally:
            self._syncing = False
        self._publish_offsets()

    def _publish_offsets(self) -> None:
        """``slice_positions``: where each view's plane cuts its axis, RAS mm (S for axial, A for coronal,
        R for sagittal views), from the slice node's SliceToRAS."""
        positions = {}
        for vid, view in self.views.items():
            m = view.get_view_node().GetSliceToRAS()
            axis = RAS_AXIS[vid.split("_", 1)[1]]
            positions[vid] = round(float(m.GetElement(axis, 3)), 3)
        if positions != self.state.slice_positions:
            with self.state:
                self.state.slice_positions = positions

    def _update_overlay(self) -> None:
        show, column = bool(self.state.jac_show), self.state.jac_column
        for vid, view in self.views.items():
            on = show and vid.startswith(column + "_")
            composite = view._logic.GetSliceCompositeNode()
            composite.SetLabelVolumeID(self.jacobian.GetID() if on else None)
            composite.SetLabelOpacity(float(self.state.jac_opacity))
        self._render_all()

    def _render_all(self) -> None:
        for view in self.views.values():
            view.schedule_render()

    def jump_to_landmark(self, index: int) -> None:
        """Centre every view on landmark ``index`` (0-based) of the fixed image."""
        import slicer

        lm = self.data.landmarks
        if lm is None or not 0 <= int(index) < len(lm.fixed):
            return
        r, a, s = lm.fixed[int(index)] * np.array([-1.0, -1.0, 1.0])
        self._syncing = True
        try:
            slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, float(r), float(a), float(s),
                                                  slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        finally:
            self._syncing = False
        self.state.lm_selected = int(index)
        self._publish_offsets()
        self._render_all()

    def reset_views(self) -> None:
        self._fit_views()
        self._render_all()

    # ----------------------------------------------------------------- state bindings
    def _bind_state(self) -> None:
        s = self.state

        @s.change("jac_show", "jac_column", "jac_opacity")
        def _overlay(**_):
            self._update_overlay()

        @s.change("jac_range")
        def _range(**_):
            self._update_jacobian_colors()
            self._render_all()

        @s.change("ct_window")
        def _ct(**_):
            self._update_ct_window()
            self._render_all()

        @s.change("diff_window")
        def _diff(**_):
            self._update_difference_window()
            self._render_all()

        @s.change("lm_show")
        def _landmarks(**_):
            for node in self.markups:
                node.GetDisplayNode().SetVisibility(bool(s.lm_show))
            self._render_all()

        self.ctrl.jump_to_landmark = self.jump_to_landmark
        self.ctrl.reset_views = self.reset_views

    # ----------------------------------------------------------------- page
    def _view_overlay_ui(self, server, trame_view_id: str, view) -> None:
        """What each view shows on top of its image: its name and slice position."""
        from trame.widgets import html

        vid = view.get_singleton_tag()
        column, orientation = vid.split("_", 1)
        title = dict(COLUMNS)[column]
        letter = "RAS"[RAS_AXIS[orientation]]
        html.Div(f"{title} \u00b7 {orientation}  {letter} {{{{ (slice_positions['{vid}'] ?? 0).toFixed(1) }}}} mm",
                 classes="dlr-view-label",
                 style=f"position:absolute;top:2px;left:6px;color:{ORIENTATION_COLORS[orientation]};"
                       "font:12px monospace;pointer-events:none;text-shadow:0 0 2px #000;")

    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import VAppLayout
        from trame.widgets import client, html
        from trame.widgets import vuetify3 as v3
        from trame_slicer.app.logic import get_view_trame_id

        style = """
        html { overflow: hidden; }
        .dlr-grid { display: grid; grid-template-columns: repeat(3, 1fr); grid-template-rows: 22px repeat(3, 1fr);
                    gap: 2px; height: calc(100vh - 40px); background: #000; }
        .dlr-head { color: #ddd; font: 13px sans-serif; text-align: center; line-height: 22px; }
        .dlr-view { position: relative; min-width: 0; min-height: 0; display: flex; }
        .dlr-lm { cursor: pointer; } .dlr-lm:hover { background: #333; }
        .dlr-lm.dlr-sel { background: #444; }
        .dlr-swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }
        """
        with VAppLayout(self.server, full_height=True, theme="dark") as layout:
            client.Style(style)
            with v3.VAppBar(density="compact", height=40):
                v3.VAppBarTitle(f"DeepLungReg \u2013 {self.data.title}", classes="text-subtitle-1")
                html.Div("{{ summary.join(' \u00b7 ') }}", classes="text-caption mr-4", id="summary")
            with v3.VNavigationDrawer(permanent=True, width=330, classes="pa-2"):
                self._controls_ui(v3, html)
            with v3.VMain(), html.Div(classes="dlr-grid", id="views"):
                for _, title in COLUMNS:
                    html.Div(title, classes="dlr-head")
                for orientation in ORIENTATIONS:
                    for column, _ in COLUMNS:
                        vid = view_id(column, orientation)
                        with html.Div(classes="dlr-view", id=f"view_{vid}"):
                            client.ServerTemplate(name=get_view_trame_id(self.server, self.views[vid]))
        self.layout = layout

    def _controls_ui(self, v3, html) -> None:
        html.Div("Images", classes="text-overline")
        v3.VSelect(label="CT window", v_model=("ct_window",), items=(list(CT_WINDOWS),), density="compact",
                   hide_details=True, classes="mb-2")
        v3.VSlider(label="Difference \u00b1 HU", v_model=("diff_window",), min=50, max=1500, step=50,
                   density="compact", hide_details=True, thumb_label=True)
        v3.VBtn("Reset views", click=self.ctrl.reset_views, size="small", variant="tonal", classes="mb-2")
        v3.VDivider(classes="my-2")
        html.Div("Jacobian determinant (lung)", classes="text-overline")
        v3.VSwitch(label="show overlay", v_model=("jac_show",), density="compact", hide_details=True, id="jac_show")
        v3.VSelect(label="on column", v_model=("jac_column",), density="compact", hide_details=True,
                   items=([{"title": t, "value": k} for k, t in COLUMNS],), classes="mb-2")
        v3.VSlider(label="opacity", v_model=("jac_opacity",), min=0.0, max=1.0, step=0.05, density="compact",
                   hide_details=True, thumb_label=True)
        v3.VRangeSlider(label="range", v_model=("jac_range",), min=0.05, max=4.0, step=0.05, density="compact",
                        hide_details=True, thumb_label=True, strict=True)
        html.Div("det {{ jac_range[0] }} (blue, compression) \u2013 1 (transparent) \u2013 {{ jac_range[1] }} "
                 "(red, expansion), log scale; <span style='color:#0f0'>lime</span>: folding (det \u2264 0). "
                 "In the lung: {{ jac_lung_range[0] }} .. {{ jac_lung_range[1] }}", classes="text-caption")
        html.Div(v_for="note in notes", key="note", children=["{{ note }}"], classes="text-caption text-warning")
        with html.Div(v_if=("lm_rows.length",)):
            v3.VDivider(classes="my-2")
            html.Div("Landmarks (TRE after registration)", classes="text-overline")
            v3.VSwitch(label="show markers", v_model=("lm_show",), density="compact", hide_details=True,
                       id="lm_show")
            with html.Div(classes="text-caption mb-1"):
                with html.Span(v_for="b in lm_legend", key="b.label", classes="mr-2"):
                    html.Span(classes="dlr-swatch", style=("{background: b.color}",))
                    html.Span("{{ b.label }} ({{ b.count }})")
            with html.Div(style="max-height: 40vh; overflow-y: auto;"), html.Table(
                    classes="text-caption", style="width:100%; border-collapse: collapse;", id="lm_table"):
                with html.Tr():
                    html.Th("#")
                    html.Th("TRE before (mm)")
                    html.Th("TRE after (mm)")
                with html.Tr(v_for="row in lm_rows", key="row.i", id=("`lm_row_${row.i}`",),
                             classes=("`dlr-lm ${row.i === lm_selected ? 'dlr-sel' : ''}`",),
                             click=(self.ctrl.jump_to_landmark, "[row.i]")):
                    with html.Td():
                        html.Span(classes="dlr-swatch", style=("{background: row.color}",))
                        html.Span("{{ row.label }}")
                    html.Td("{{ row.before.toFixed(2) }}")
                    html.Td("{{ row.after.toFixed(2) }}")


# --------------------------------------------------------------------------- entry point
def serve(outdir: str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT, case: str | None = None,
          fixed_landmarks: str | None = None, moving_landmarks: str | None = None,
          landmark_format: str = "auto") -> int:
    """Check, load and serve until interrupted. Errors in the input raise :class:`InputError`."""
    resolve_output(outdir, case)   # a wrong folder or a busy port is refused before anything heavy is imported
    check_port(host, port)
    check_dependencies()
    _use_egl_when_headless()
    data = load(outdir, case, fixed_landmarks, moving_landmarks, landmark_format)
    argv, sys.argv = sys.argv, sys.argv[:1]  # trame parses sys.argv: keep 'view' options away from it
    try:
        viewer = RegistrationViewer(data)

        def ready(**_):
            print(f"deeplungreg view: {data.outdir} at http://{host}:{viewer.server.port}/ (Ctrl+C to stop)",
                  flush=True)

        viewer.ctrl.on_server_ready.add(ready)
        viewer.server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0,
                            disable_logging=True)
    except OSError as exc:
        raise InputError(f"cannot serve on {host}:{port} ({exc.strerror or exc})") from None
    finally:
        sys.argv = argv
    return 0


def main_args(a) -> int:
    """``deeplungreg view`` with parsed arguments (see :mod:`DeepLungRegLib.cli`)."""
    return serve(Path(a.outdir), host=a.host, port=a.port, case=a.case, fixed_landmarks=a.fixed_landmarks,
                 moving_landmarks=a.moving_landmarks, landmark_format=a.landmark_format)
