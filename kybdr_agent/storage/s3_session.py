"""One botocore session per event loop for every S3 client, slimmed to what an S3 client reads.

botocore's loaded models were ~45 MiB of the S3 path's memory (issue 12): every client created its own
session and loaded every service's endpoints and the S3 model with its documentation. Sharing one session
loads them once; dropping what S3 clients never read keeps the rest small. Both reach into botocore's
internals and fall back to the default behaviour if those change.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, Final

from aiobotocore.session import AioSession, get_session
from botocore.regions import EndpointResolver

from kybdr_agent.telemetry import get_logger

log = get_logger("kybdr_agent.s3")

# The services whose endpoints a session's clients resolve: S3, and STS/SSO for the credential providers.
_ENDPOINT_SERVICES: Final = frozenset({"s3", "sts", "sso", "sso-oidc"})
_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AioSession] = weakref.WeakKeyDictionary()


def s3_session() -> AioSession:
    """One botocore session per event loop for every S3 client (the repository, the DR bucket), so its models
    are loaded once; per loop because credential providers keep asyncio locks."""
    loop = asyncio.get_running_loop()
    session = _SESSIONS.get(loop)
    if session is None:
        session = _SESSIONS[loop] = get_session()
        _slim_endpoints(session)
    return session


def _slim_endpoints(session: AioSession) -> None:
    """Give the session's endpoint resolver only the services its clients call: botocore's endpoints.json
    describes every AWS service and decodes to 6.7 MiB, kept for the client's life; S3's entries are a few KiB
    (the S3 client resolves its endpoints from its rule set and uses this table for partitions and regions).
    Reaches into botocore's loader and component registry: if those change, the session stays as it was."""
    try:
        loader = session.get_component("data_loader")
        endpoints, path = loader.load_data_with_path("endpoints")
        loader._cache.pop(("load_data_with_path", "endpoints"), None)
        partitions = [
            {**p, "services": {name: spec for name, spec in p["services"].items() if name in _ENDPOINT_SERVICES}}
            for p in endpoints["partitions"]
        ]
        resolver = EndpointResolver({**endpoints, "partitions": partitions}, loader.is_builtin_path(path))
        session._internal_components.register_component("endpoint_resolver", resolver)
    except (AttributeError, KeyError, TypeError) as exc:
        log.debug("s3.endpoints_not_slimmed", reason=f"{type(exc).__name__}: {exc}")


def drop_documentation(client: Any) -> None:
    """Drop the S3 model's documentation strings (80 % of its 3.2 MiB as botocore decodes it; read only to
    write docstrings). The model is shared through the session's loader, so once is enough."""
    try:
        model = client.meta.service_model._service_description
        for operation in model.get("operations", {}).values():
            operation.pop("documentation", None)
            operation.pop("documentationUrl", None)
        for shape in model.get("shapes", {}).values():
            shape.pop("documentation", None)
            for member in shape.get("members", {}).values():
                member.pop("documentation", None)
    except (AttributeError, KeyError, TypeError) as exc:
        log.debug("s3.model_docs_kept", reason=f"{type(exc).__name__}: {exc}")
