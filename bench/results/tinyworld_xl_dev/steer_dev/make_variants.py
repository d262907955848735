"""The dev variants of the tinyworld-xl stack: its manifest with SafeRedir steering (and escalating), no rebuild."""
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.test_guard_stack import with_settings
base = Path("engines/tinyworld_xl_safe.plan")
with_settings(base, Path(".cache/sweep/xl_steer.plan"), saferedir={"steer_away": "knife, blood, skull", "steer_weight": 0.4})
with_settings(base, Path(".cache/sweep/xl_esc.plan"), saferedir={"steer_away": "knife, blood, skull", "steer_weight": 0.4,
                                                            "steer_escalate": 1.0, "escalate_patch": True})
