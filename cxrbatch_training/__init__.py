"""Reproduction of arXiv 2512.23089 (MedSAM lung masks for multi-label chest X-ray
classification) and the bundles cxrbatch runs: NIH ChestX-ray14 curation, MedSAM
fine-tuning, lung mask generation, classifier training and evaluation, the study runner
and bundle export (`cxrbatch training ...`, cxrbatch_training/cli.py).

The import name is `cxrbatch_training`, not a generic `training`, so that installing the
wheel claims no name another project may use.
"""
