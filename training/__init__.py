"""Reproduction of arXiv 2512.23089 (MedSAM lung masks for multi-label CXR classification).

Built so far: the NIH ChestX-ray14 curation (`python -m training curate`). MedSAM
fine-tuning, mask generation, classifier training, evaluation, the study runner and
bundle export are open work (issue 4).
"""
