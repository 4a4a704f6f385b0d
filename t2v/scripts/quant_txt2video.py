"""Alias of `t2v.scripts.quant_inference` under the reference's script name."""
import sys

from t2v.scripts.quant_inference import main

if __name__ == "__main__":
    sys.exit(main())
