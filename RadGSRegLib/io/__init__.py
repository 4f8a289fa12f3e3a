"""Reading and writing: case folders, result folders, images, transforms (all LPS, mm)."""
from .errors import CaseFormatError
from .images import read_label_map, read_volume, read_xray, write_volume, write_xray
from .transforms import read_transform, write_transform
from .segmentation import Segmentation, read_segmentation
from .dicom_geometry import view_from_dicom
from .case import (Case, Result, read_case, write_case, read_geometry, write_geometry,
                   read_result, write_result, IMAGE_KINDS, VIEW_NAMES)
from .atomic import OutputExistsError, atomic_dir, atomic_file
from .outputs import (MARKER, FOLDER_KINDS, FILE_KINDS, check_output, check_output_file, read_marker,
                      write_marker, why_not_ours, why_not_own_file, write_json, write_png)

__all__ = ["CaseFormatError", "read_volume", "read_label_map", "write_volume", "read_xray", "write_xray",
           "read_transform", "write_transform", "Case", "Result", "read_case", "write_case",
           "Segmentation", "read_segmentation", "view_from_dicom", "read_geometry", "write_geometry", "read_result", "write_result", "IMAGE_KINDS", "VIEW_NAMES",
           "OutputExistsError", "atomic_dir", "atomic_file", "MARKER", "FOLDER_KINDS", "FILE_KINDS", "check_output",
           "check_output_file", "read_marker", "write_marker", "why_not_ours", "why_not_own_file", "write_json",
           "write_png"]
