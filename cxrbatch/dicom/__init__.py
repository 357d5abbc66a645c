"""DICOM input and output: discovery, selection, decoding, SEG and SR writers, codes."""
