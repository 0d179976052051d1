"""The kod.mobi API client: `KodMobiClient`, its answer models and its error tree."""

from worker.kodmobi.client import KodMobiClient
from worker.kodmobi.errors import Action, KodMobiError, decide, is_retryable

__all__ = ["Action", "KodMobiClient", "KodMobiError", "decide", "is_retryable"]
