import sys
from pathlib import Path

# The shared harness (tests/parity.py) is imported as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
