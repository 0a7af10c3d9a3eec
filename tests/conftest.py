import sys
from pathlib import Path

# tests import their shared fixtures (hf_parity) as plain modules
sys.path.insert(0, str(Path(__file__).parent))
