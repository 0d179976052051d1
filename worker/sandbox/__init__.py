"""The sandbox: a fast, faithful imitation of kod.mobi for the demo, tests and benchmarks."""

from worker.sandbox.app import create_app
from worker.sandbox.config import SandboxConfig

__all__ = ["SandboxConfig", "create_app"]
