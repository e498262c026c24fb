"""The Score-CAM benchmark (``python -m bench``): floor, ours, a torch reference and the fast modes,
side by side in one run on one machine. Not a dependency of the runtime; the export step and the torch
reference need torch. See ``bench/__main__.py`` for the plan and ``bench/results/`` for results.
"""
