"""The model lifecycle: a site's labels (labels.py), calibrating a bundle on the site's
own outcomes (calibrate.py), comparing a shadow candidate with the live model
(compare.py) and re-running a backlog with a new model version (reprocess.py)."""
