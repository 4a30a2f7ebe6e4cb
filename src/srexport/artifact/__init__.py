"""The artifact contract: what an srexport artifact folder is, for every reader and writer.

- ``specs``: one ``ComponentSpec`` per graph (names, named dims, dtypes, sample inputs, profiles);
- ``manifest``: the folder and its ``manifest.json``: JSON Schema validation on read and write
  (``manifest.schema.json``), paths kept inside the folder, sha256 of every file, atomic writes;
- ``tile_settings`` and ``tile_plan``: the tiling geometry recorded in the manifest and the
  grids and shapes (engine profiles) that follow from it;
- ``compatibility``: whether a built TensorRT engine may load on the running machine.

Everything else (models, runtime, calibration, export, serving) reads this package; it reads
nothing of theirs (tests/test_layers.py).
"""
