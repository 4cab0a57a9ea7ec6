"""The GitHub REST API's request headers, shared by the nodes that call it (the monitor's
repository_dispatch trigger, the control node's superseded-request bookkeeping).

One place for the API version they were written against: GitHub answers by the version header, so
two copies could drift apart silently.
"""

from __future__ import annotations

API_VERSION = "2022-11-28"


def api_headers(token: str) -> dict[str, str]:
    """Headers for one authenticated GitHub REST API call with `token`."""
    return {"Accept": "application/vnd.github+json", "Authorization": f"Bearer {token}",
            "X-GitHub-Api-Version": API_VERSION}
