"""Serving artifacts from Triton Inference Server: a model repository written from the manifest
(``repository``), the Python-backend models it runs (``triton_models``), and the launcher of the
tritonserver that the ``serve`` extra ships (``launcher``)."""
