"""Ways studies come in: the watched folder and the DICOM C-STORE receiver, all into one spool."""
