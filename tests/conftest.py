"""Make the flat modules at the repository root importable from the tests, whatever the working directory."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
