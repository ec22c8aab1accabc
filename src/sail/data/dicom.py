"""One DICOM series (a folder) -> a float32 volume in scanner units and its RAS affine.

Read with SimpleITK's GDCM series reader: it groups files by SeriesInstanceUID, sorts them by
position along the slice normal (ImagePositionPatient / ImageOrientationPatient), applies each
file's RescaleSlope / RescaleIntercept, and decodes compressed transfer syntaxes (JPEG, JPEG-LS,
JPEG 2000, RLE) without further plugins. The result uses the array axes (i, j, k) = (column, row,
slice) and nibabel's RAS world (DICOM's LPS with x and y negated), so the slicer treats it like a
NIfTI volume. No header field is returned: nothing from DICOM reaches slices.parquet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Largest relative deviation of slice gaps from their median before a series counts as irregular.
_GAP_TOLERANCE = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class DicomDefect(Exception):
    """The folder is not one readable, regularly spaced DICOM series."""


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(volume (I, J, K) float32, 4x4 RAS affine) of the one series in ``folder``."""
    import SimpleITK as sitk

    folder = Path(folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DicomDefect(f"no DICOM series in folder {folder}")
    if len(series) > 1:
        raise DicomDefect(
            f"folder {folder} holds {len(series)} DICOM series; give one series per manifest row"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) < 2:
        raise DicomDefect(
            f"DICOM series in {folder} has {len(files)} file(s); a volume needs at least 2 slices"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-file positions, read in the same pass
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DicomDefect(
            f"cannot read DICOM series in {folder}: {str(exc).strip().splitlines()[-1]}"
        ) from None
    _check_regular_spacing(reader, len(files), folder)
    volume = np.ascontiguousarray(
        sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    )  # (K, J, I) -> (I, J, K)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return volume, affine


def _check_regular_spacing(reader, n_files: int, folder: Path) -> None:
    """Missing or unevenly spaced slices would be silently stretched; refuse them instead."""
    positions, normal = [], None
    for i in range(n_files):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            raise DicomDefect(f"DICOM series in {folder}: slice {i} has no ImagePositionPatient")
        positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
        if normal is None and reader.HasMetaDataKey(i, "0020|0037"):
            iop = [float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")]
            normal = np.cross(iop[:3], iop[3:])
    along = np.asarray(positions) @ (normal if normal is not None else np.array([0.0, 0.0, 1.0]))
    gaps = np.diff(np.sort(along))
    median = float(np.median(gaps))
    if median <= 0 or np.abs(gaps - median).max() > _GAP_TOLERANCE * median + 1e-3:
        raise DicomDefect(
            f"DICOM series in {folder} has missing, duplicate or irregularly spaced slices "
            f"(gaps {gaps.min():.3f}-{gaps.max():.3f} mm)"
        )
