"""cxrbatch: a DICOM-integrated batch processor for chest X-rays.

Outputs are algorithm results, not for diagnostic use.
"""

__version__ = "0.1.0"
