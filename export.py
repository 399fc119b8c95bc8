"""Export a checkpoint for sharing: `python export.py ckpt_path=<run>/checkpoints/best.pt [formats=[...]]`.

Writes model.yaml + model.pt (a module that takes raw inputs), model.safetensors, model.onnx, README.md (the raw
input it expects), class_names.json into <run>/export/. Options (key=value, defaults in conf/export.yaml). See docs/export.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    from lab.export import main

    main(sys.argv[1:], Path(__file__).resolve().parent / "conf" / "export.yaml")
