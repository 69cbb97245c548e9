"""One module per Triton model (the classes that `model_repository/*/1/model.py` name)."""
