"""Top-k classes per image from a checkpoint: `python predict.py ckpt_path=best.pt inputs=<image or folder>`.

Options (key=value): top_k=5, device=auto, batch_size=32. See docs/transfer-learning.md.
"""

import sys

if __name__ == "__main__":
    from lab.predict import main

    main(sys.argv[1:])
