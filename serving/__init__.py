"""The scoring service: FastAPI over an artifact written by ``trainer.export``.

It never imports ``trainer``: the inference module is rebuilt from the artifact with its own
small torch code (``serving.model``), and request values are mapped by the same
``schemas.hashing`` the trainer's reader uses. Start it with ``python -m serving --model-dir DIR``
or build the app with ``serving.main.create_app``.
"""
