"""The Slicer edge: MRML nodes <-> library objects. The only place where RAS appears.

Needs the MRML classes of Slicer (inside Slicer, or the ``slicer-core`` wheel headless);
imported only by the Slicer modules and their tests, never by the rest of the library.

* Volume nodes <-> ``SimpleITK.Image`` (LPS): ``IJKToRAS = diag(-1, -1, 1) @ [D·S | o]_LPS``.
* Markups <-> ``(N, 3)`` LPS arrays (x and y negated).
* A transform mapping fixed to moving points (ITK resampling direction) becomes a
  ``vtkMRMLGridTransformNode`` whose ``FromParent`` is that mapping in RAS: the moving volume
  placed under it is shown aligned with the fixed volume.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- volumes
def _matrix3(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            out.SetElement(r, c, float(m[r, c]))
    return out


def volume_node_to_image(node) -> sitk.Image:
    """Scalar volume node -> float32 SimpleITK image with LPS geometry (transforms of the node ignored)."""
    image_data = node.GetImageData()
    if image_data is None:
        raise ValueError(f"volume node {node.GetName()!r} has no image data")
    dims = image_data.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    img = sitk.GetImageFromArray(arr.astype(np.float32, copy=True))
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    lin = LPS_TO_RAS @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lin / spacing[None, :]).ravel().tolist())
    img.SetOrigin((LPS_TO_RAS @ ijk_to_ras[:3, 3]).tolist())
    return img


def image_to_volume_node(img: sitk.Image, scene, name: str, node=None):
    """SimpleITK image (LPS) -> scalar volume node in ``scene`` (created if ``node`` is None)."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    arr = sitk.GetArrayFromImage(img)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(arr).ravel(), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image_data)
    direction_ras = LPS_TO_RAS @ np.asarray(img.GetDirection()).reshape(3, 3)
    node.SetIJKToRASDirectionMatrix(_matrix3(direction_ras))
    node.SetSpacing(*img.GetSpacing())
    node.SetOrigin(*(LPS_TO_RAS @ np.asarray(img.GetOrigin())).tolist())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------- markups
def markups_to_lps(node) -> np.ndarray:
    """Control points of a markups node (world positions, RAS) -> (N, 3) LPS mm."""
    n = node.GetNumberOfControlPoints()
    pts = np.zeros((n, 3))
    p = [0.0, 0.0, 0.0]
    for i in range(n):
        node.GetNthControlPointPositionWorld(i, p)
        pts[i] = p
    return pts @ LPS_TO_RAS


def lps_to_markups(points: np.ndarray, scene, name: str, labels: list[str] | None = None, node=None):
    """(N, 3) LPS mm -> a point-list markups node (RAS)."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.RemoveAllControlPoints()
    for i, p in enumerate(np.asarray(points, float) @ LPS_TO_RAS):
        idx = node.AddControlPoint(float(p[0]), float(p[1]), float(p[2]))
        if labels is not None:
            node.SetNthControlPointLabel(idx, labels[i])
    return node


# --------------------------------------------------------------------------- transforms
def transform_to_grid(tx: sitk.Transform, reference: sitk.Image, lattice=None) -> sitk.Image:
    """``T(x) - x`` (LPS mm, float64 vectors) sampled on ``lattice`` (a NetworkGrid-like object
    with origin/spacing/direction/size) extended to cover ``reference``, or on ``reference``."""
    if lattice is None:
        return sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, reference.GetSize(),
                                                 reference.GetOrigin(), reference.GetSpacing(),
                                                 reference.GetDirection())
    m = np.asarray(lattice.direction).reshape(3, 3)
    sp = np.asarray(lattice.spacing)
    # reference corners in the lattice's index frame -> integer extension covering them
    n = np.asarray(reference.GetSize())
    corners = np.array([[a, b, c] for a in (0, n[0] - 1) for b in (0, n[1] - 1) for c in (0, n[2] - 1)], float)
    ref_m = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())[None, :]
    pts = np.asarray(reference.GetOrigin())[None, :] + corners @ ref_m.T
    idx = (pts - np.asarray(lattice.origin)[None, :]) @ np.linalg.inv(m * sp[None, :]).T
    lo = np.minimum(np.floor(idx.min(0)), 0).astype(int)
    hi = np.maximum(np.ceil(idx.max(0)), np.asarray(lattice.size) - 1).astype(int)
    origin = np.asarray(lattice.origin) + m @ (sp * lo)
    size = (hi - lo + 1).tolist()
    return sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, size, origin.tolist(), sp.tolist(),
                                             tuple(float(v) for v in m.ravel()))


def displacement_to_grid_transform_node(field_lps: sitk.Image, scene, name: str, node=None):
    """Vector image ``d`` (LPS mm, on an LPS grid) of the mapping ``x -> x + d(x)`` (fixed -> moving)
    -> ``vtkMRMLGridTransformNode`` with that mapping as ``FromParent`` (RAS), linear interpolation."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    d = sitk.GetArrayFromImage(field_lps) @ LPS_TO_RAS  # (k, j, i, 3) RAS vectors
    size = field_lps.GetSize()
    grid = vtk.vtkImageData()
    grid.SetDimensions(*size)
    grid.SetSpacing(*field_lps.GetSpacing())
    grid.SetOrigin(*(LPS_TO_RAS @ np.asarray(field_lps.GetOrigin())).tolist())
    vec = numpy_support.numpy_to_vtk(np.ascontiguousarray(d, dtype=np.float64).reshape(-1, 3), deep=True)
    vec.SetNumberOfComponents(3)
    grid.GetPointData().SetScalars(vec)
    t = slicer.vtkOrientedGridTransform()
    t.SetDisplacementGridData(grid)
    t.SetGridDirectionMatrix(_matrix3(LPS_TO_RAS @ np.asarray(field_lps.GetDirection()).reshape(3, 3)))
    t.SetInterpolationModeToLinear()
    node.SetAndObserveTransformFromParent(t)
    return node


def read_transform_node(path: str, scene, name: str):
    """Load an ITK transform file with Slicer's own reader (as the GUI does)."""
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer could not read the transform {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def set_registration_references(transform_node, fixed_node, moving_node) -> None:
    """Record which volumes a registration transform belongs to (as SlicerElastix does)."""
    transform_node.SetNodeReferenceID(transform_node.GetMovingNodeReferenceRole(), moving_node.GetID())
    transform_node.SetNodeReferenceID(transform_node.GetFixedNodeReferenceRole(), fixed_node.GetID())


# --------------------------------------------------------------------------- display helpers
def jacobian_color_node(scene, name: str = "DeepLungRegJacobianColors", low: float = -0.1, high: float = 2.0):
    """Diverging table over [low, high]: blue (compression) - white at 1 - red (expansion),
    and bright green for determinants <= 0 (folding)."""
    node = scene.GetFirstNode(name, "vtkMRMLColorTableNode")
    if node is not None:
        return node, low, high
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    n = 256
    node.SetNumberOfColors(n)
    for i in range(n):
        v = low + (high - low) * i / (n - 1)
        if v <= 0:
            rgb = (0.0, 1.0, 0.0)
        elif v < 1:
            t = v
            rgb = (t, t, 1.0)
        else:
            t = min((v - 1) / (high - 1), 1.0)
            rgb = (1.0, 1 - t, 1 - t)
        node.SetColor(i, f"{v:.3f}", *rgb, 1.0)
    return node, low, high


def show_jacobian(volume_node, scene) -> None:
    color, low, high = jacobian_color_node(scene)
    disp = volume_node.GetDisplayNode()
    if disp is None:
        volume_node.CreateDefaultDisplayNodes()
        disp = volume_node.GetDisplayNode()
    disp.SetAndObserveColorNodeID(color.GetID())
    disp.AutoWindowLevelOff()
    disp.SetWindowLevelMinMax(low, high)


def tre_table(scene, fixed_lps: np.ndarray, moving_lps: np.ndarray, mapped_lps: np.ndarray,
              affine_lps: np.ndarray | None = None, name: str = "DeepLungReg TRE", node=None):
    """Table node with one row per landmark: TRE before/after (mm) and the points (RAS)."""
    from .metrics import target_registration_error

    before = target_registration_error(fixed_lps, moving_lps)
    after = target_registration_error(mapped_lps, moving_lps)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    table.Initialize()
    cols = {"landmark": np.arange(1, len(before) + 1, dtype=np.int32), "TRE before (mm)": before,
            "TRE after (mm)": after}
    if affine_lps is not None:
        cols["TRE affine (mm)"] = target_registration_error(affine_lps, moving_lps)
    ras = {"fixed": fixed_lps @ LPS_TO_RAS, "moving": moving_lps @ LPS_TO_RAS}
    for key, pts in ras.items():
        for a, axis in enumerate("RAS"):
            cols[f"{key} {axis}"] = pts[:, a]
    for title, values in cols.items():
        arr = vtk.vtkIntArray() if values.dtype.kind == "i" else vtk.vtkDoubleArray()
        arr.SetName(title)
        arr.SetNumberOfTuples(len(values))
        for i, v in enumerate(values):
            arr.SetValue(i, v.item())
        table.AddColumn(arr)
    node.Modified()
    return node, before, after


def tre_plot(scene, table_node, name: str = "DeepLungReg TRE plot"):
    """Plot chart: TRE before and after per landmark (a Slicer plot chart node)."""
    chart = scene.GetFirstNode(name, "vtkMRMLPlotChartNode") or scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.RemoveAllPlotSeriesNodeIDs()
    for column, color in (("TRE before (mm)", (0.6, 0.6, 0.6)), ("TRE after (mm)", (0.85, 0.1, 0.1))):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("landmark")
        series.SetYColumnName(column)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle("Target registration error per landmark")
    chart.SetXAxisTitle("landmark")
    chart.SetYAxisTitle("TRE (mm)")
    return chart
