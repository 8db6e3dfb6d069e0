"""`python -m demo [train options]`: the embedded default, which `python train.py` runs when given no paths."""
import sys

from demo import main
from infra.errors import user_errors

if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
