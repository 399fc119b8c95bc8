"""Export a checkpoint for sharing: `python export.py ckpt_path=<run>/checkpoints/best.pt [formats=[...]]`.

Writes model.pt (plain state_dict), model.safetensors, model.onnx, model.yaml, class_names.json into
<run>/export/. Options (key=value, defaults in conf/export.yaml). See docs/export.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    from lab.export import main

    main(sys.argv[1:], Path(__file__).resolve().parent / "conf" / "export.yaml")
