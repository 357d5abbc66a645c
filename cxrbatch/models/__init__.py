"""Models: the MedSAM-family lung segmenter, study masks, classifier bundles, screening."""
