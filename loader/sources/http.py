"""Ranged GETs into the caller's buffer (http and https): warmstart.storage.http."""

from warmstart.storage.errors import DENIED_CODES, NOT_FOUND_CODES, RETRY_CODES
from warmstart.storage.errors import error_for_body as error_for_status
from warmstart.storage.http import ConnectionPool, Url, ranged_get_into, tls_context

__all__ = ["ConnectionPool", "Url", "ranged_get_into", "tls_context", "error_for_status",
           "DENIED_CODES", "NOT_FOUND_CODES", "RETRY_CODES"]
