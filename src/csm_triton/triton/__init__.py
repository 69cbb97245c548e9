"""The Triton layer: `adapter` is the only module that imports
`triton_python_backend_utils`; `parameters` reads model configs; `models/` holds one
module per Triton model, each named by a one-line `model.py` in the repository.
"""
