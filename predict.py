"""What the task predicts, from raw inputs: `python predict.py ckpt_path=best.pt inputs=<image, folder or CSV>`.

Options (key=value): output=<file.csv> (one row per input), top_k=5, device=auto, batch_size=32. See
docs/export.md.
"""

import sys

if __name__ == "__main__":
    from lab.predict import main

    main(sys.argv[1:])
