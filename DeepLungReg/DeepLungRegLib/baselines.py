"""Conventional baselines run through the same harness: elastix (itk-elastix) and SimpleITK demons.

Every baseline returns a SimpleITK transform mapping fixed physical points to moving
physical points (LPS mm), like DeepLungReg's own output.

elastix parameters follow the published lung settings of Staring et al. (e.g. "Pulmonary
image registration with elastix using a standard intensity-based algorithm", EMPIRE10):
an affine stage, then a B-spline stage with normalised correlation and a bending-energy
penalty, multi-resolution, final grid spacing 10 mm, 2000 random samples per iteration,
metric sampled inside the (dilated) fixed lung mask.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import SimpleITK as sitk


@contextlib.contextmanager
def _working_directory(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _to_itk(img: sitk.Image, pixel=np.float32):
    import itk

    out = itk.image_view_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(img).astype(pixel)))
    out.SetOrigin(img.GetOrigin())
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.asarray(img.GetDirection()).reshape(3, 3)))
    return out


def elastix_parameter_maps(iterations: int = 500, resolutions: int = 4, final_grid_mm: float = 10.0,
                           samples: int = 2000, bending_weight: float = 0.05):
    """Affine + B-spline lung parameter maps (itk.ParameterObject)."""
    import itk

    po = itk.ParameterObject.New()
    affine = po.GetDefaultParameterMap("affine", resolutions)
    bspline = po.GetDefaultParameterMap("bspline", resolutions)
    for pm in (affine, bspline):
        pm["Metric"] = ["AdvancedNormalizedCorrelation"] if pm is affine else \
            ["AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty"]
        pm["NumberOfSpatialSamples"] = [str(samples)]
        pm["ImageSampler"] = ["RandomCoordinate"]
        pm["NewSamplesEveryIteration"] = ["true"]
        pm["MaximumNumberOfIterations"] = [str(iterations)]
        pm["ErodeMask"] = ["false"]
        pm["WriteResultImage"] = ["false"]
    bspline["Metric0Weight"] = ["1.0"]
    bspline["Metric1Weight"] = [str(bending_weight)]
    bspline["FinalGridSpacingInPhysicalUnits"] = [str(final_grid_mm)]
    po.AddParameterMap(affine)
    po.AddParameterMap(bspline)
    return po


def elastix_register(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
                     iterations: int = 500, resolutions: int = 4) -> sitk.Transform:
    """Register with elastix; returns the dense fixed -> moving displacement as a SimpleITK transform."""
    import itk

    f, m = _to_itk(fixed), _to_itk(moving)
    kwargs = {}
    if fixed_mask is not None:
        mask = sitk.Resample(fixed_mask, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        mask = sitk.BinaryDilate(mask, [3, 3, 3])
        kwargs["fixed_mask"] = _to_itk(mask, np.uint8)
    po = elastix_parameter_maps(iterations=iterations, resolutions=resolutions)
    # transformix writes deformationField.nii into the working directory: keep it in a temporary one
    with tempfile.TemporaryDirectory(prefix="deeplungreg-elastix-") as tmp, _working_directory(tmp):
        _, params = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False, **kwargs)
        field = itk.transformix_deformation_field(m, params)
    arr = np.asarray(itk.array_from_image(field), dtype=np.float64)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.CopyInformation(fixed)
    return sitk.DisplacementFieldTransform(img)


def demons_register(fixed: sitk.Image, moving: sitk.Image, spacing_mm: float = 3.0, iterations: int = 100,
                    sigma_mm: float = 1.5) -> sitk.Transform:
    """SimpleITK diffeomorphic demons on ~3 mm copies (intensities clipped to the lung window)."""
    from .preprocessing import resample_isotropic

    def prep(img):
        small = resample_isotropic(img, spacing_mm)
        return sitk.Clamp(small, sitk.sitkFloat32, -1000.0, 200.0)

    f, m = prep(fixed), prep(moving)
    m = sitk.HistogramMatching(m, f, 256, 7, True)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(sigma_mm / spacing_mm)
    field = demons.Execute(f, m)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
