from csm_triton.triton.models.watermark import WatermarkModel as TritonPythonModel  # noqa: F401
