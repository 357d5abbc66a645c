"""Ways studies come in: the watched folder (and, later, DICOM C-STORE), all into one spool."""
