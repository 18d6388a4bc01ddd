"""Where alerts go and how they get there: the channel adapters (SNS, a JSON webhook) and each channel's outbox,
the bounded queue and worker that deliver to it with bounded, retried attempts.

Why apart from :mod:`kybdr_agent.notify`. That module decides what to say and when (events to conditions);
this one only moves bytes, and it is the only part that talks to the network or holds a secret, so the
rules that keep a page from hurting the agent live in one place: a worker per channel, so a channel that
hangs only delays its own queue; each attempt cut at ``timeout``, retried with jittered, bounded
exponential backoff up to ``max_attempts``, then logged as ``notify.dropped``; any failure but
cancellation logged and survived. A full queue loses its oldest message, with a warning, never blocks.

Channels send :meth:`Message.body` — the same JSON document everywhere. SNS (``publish`` with a subject
and message attributes for filter policies; endpoints follow botocore's environment, e.g.
``AWS_ENDPOINT_URL_SNS``) and a webhook (POST, ``Authorization: Bearer`` when a token is configured, any 2xx
is delivered, redirects are not followed so the token never travels elsewhere). The token is never logged:
it is left out of reprs, and error texts are scrubbed of it before they are logged or shown in ``status()``.
"""

from __future__ import annotations

from collections import deque
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio

from kybdr_agent import __version__
from kybdr_agent.alerts import Message, one_line
from kybdr_agent.errors import KybdrError
from kybdr_agent.telemetry import get_logger

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

    from kybdr_agent.notify import NotifyConfig

log = get_logger("kybdr_agent.notify")  # the notifier's own logger: one name for everything alerting logs

WAKE_POLL: Final = 1.0  # a worker looks at its queue at least this often, whoever appended to it
OPEN_TIMEOUT: Final = 30.0  # loading botocore's SNS model is CPU work; credentials may come from IMDS
# A channel's own timeouts are a backstop past the notifier's per-attempt bound, so the bound always wins.
BACKSTOP: Final = 1.0


class ChannelError(KybdrError):
    """A channel did not deliver a message (the text never carries a secret)."""


class Channel(Protocol):
    name: str

    async def open(self) -> None:
        """Make the client ready (idempotent, no network call): CPU work kept out of the attempt's bound."""
        ...

    async def send(self, message: Message) -> None:
        """Deliver one message or raise; the notifier bounds the time and retries."""
        ...

    async def aclose(self) -> None: ...


def redact_url(url: str) -> str:
    """A URL fit for a log line and ``/healthz``: scheme, host and port only. Many webhook services (Slack,
    Teams, Discord) put the secret in the path, so the path is never shown."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, "/…" if parts.path not in ("", "/") else parts.path, "", ""))


def scrub(text: str, config: NotifyConfig) -> str:
    """An error text fit for a log line and ``status()``: one line, no token, the webhook URL redacted."""
    token = config.webhook_token
    if token:
        text = text.replace(token, "***")
    if config.webhook_url:
        text = text.replace(config.webhook_url, redact_url(config.webhook_url))
    return one_line(text, 500)


class SnsChannel:
    """``sns:Publish`` to one topic; the client is opened on first use and kept until ``aclose``."""

    name = "sns"

    def __init__(
        self, topic_arn: str, *, region: str | None, timeout: float, session: AioSession | None = None
    ) -> None:
        self.topic_arn = topic_arn
        self.region = region
        self.timeout = timeout
        self._session = session
        self._exit: AsyncExitStack | None = None
        self._client: Any = None

    async def open(self) -> None:
        if self._client is not None:
            return
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=self.timeout + BACKSTOP,
            read_timeout=self.timeout + BACKSTOP,
            retries={"total_max_attempts": 1},  # the notifier's retries are the only ones
        )
        stack = AsyncExitStack()
        try:
            session = self._session or get_session()
            self._client = await stack.enter_async_context(
                session.create_client("sns", region_name=self.region, config=config)
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        self._exit = stack

    async def send(self, message: Message) -> None:
        await self.open()
        attributes = {"alert": message.alert, "status": message.status, "severity": message.severity}
        for name in ("database", "region"):
            value = getattr(message, name)
            if value:
                attributes[name] = value
        await self._client.publish(
            TopicArn=self.topic_arn,
            Subject=message.subject(),
            Message=message.body(),
            MessageAttributes={k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()},
        )

    async def aclose(self) -> None:
        stack, self._exit, self._client = self._exit, None, None
        if stack is not None:
            await stack.aclose()


class WebhookChannel:
    """POST the JSON body to a URL; any 2xx answer is delivered, anything else (redirects included) is not."""

    def __init__(self, url: str, *, token: str | None, timeout: float, name: str = "webhook") -> None:
        self.name = name
        self.url = url
        self.where = redact_url(url)
        self.timeout = timeout
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"WebhookChannel({self.where!r}, token={'set' if self._token else 'none'})"

    async def open(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout + BACKSTOP))

    async def send(self, message: Message) -> None:
        await self.open()
        assert self._session is not None
        headers = {"Content-Type": "application/json", "User-Agent": f"kybdr-agent/{__version__}"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            async with self._session.post(
                self.url, data=message.body().encode(), headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return
                status = response.status
        except aiohttp.ClientError as exc:
            raise ChannelError(f"POST {self.where} failed: {type(exc).__name__}: {exc}") from None
        raise ChannelError(f"POST {self.where} answered HTTP {status}")

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def build_channels(config: NotifyConfig) -> list[Channel]:
    """The channels ``config`` names: SNS when a topic is set, the webhook when a URL is."""
    channels: list[Channel] = []
    if config.sns_topic_arn:
        channels.append(SnsChannel(config.sns_topic_arn, region=config.region, timeout=config.timeout))
    if config.webhook_url:
        channels.append(WebhookChannel(config.webhook_url, token=config.webhook_token, timeout=config.timeout))
    return channels


@dataclass
class Outbox:
    """One channel's bounded queue, its worker, and what happened to its messages."""

    channel: Channel
    queue: deque[Message] = field(default_factory=deque)
    wake: anyio.Event | None = None
    sent: int = 0
    failed: int = 0  # attempts that failed (a message retried twice and then sent counts 2)
    dropped: int = 0  # messages given up after max_attempts, or pushed out of a full queue
    last_error: str | None = None

    def put(self, message: Message, queue_size: int, *, wake_now: bool) -> None:
        """Queue ``message``, pushing out the oldest when full; never blocks. ``wake_now`` only on the loop."""
        if len(self.queue) >= queue_size:
            lost = self.queue.popleft()
            self.dropped += 1
            log.warning("notify.queue_full", channel=self.channel.name, dropped_alert=lost.alert, key=lost.key)
        self.queue.append(message)
        if wake_now and self.wake is not None:
            self.wake.set()

    async def work(self, config: NotifyConfig) -> None:
        """Deliver queued messages until cancelled."""
        while True:
            if not self.queue:
                self.wake = anyio.Event()
                with anyio.move_on_after(WAKE_POLL):
                    await self.wake.wait()
                continue
            message = self.queue.popleft()
            try:
                await self.deliver(message, config)
            except Exception:  # a bug here must not end the dispatcher, nor the daemon's task group
                log.exception("notify.worker_failed", channel=self.channel.name, alert=message.alert)

    async def deliver(self, message: Message, config: NotifyConfig) -> None:
        """Bounded attempts, each bounded in time; anything but cancellation is logged and survived."""
        name = self.channel.name
        for attempt in range(1, config.max_attempts + 1):
            bound = OPEN_TIMEOUT
            try:
                with anyio.fail_after(bound):
                    await self.channel.open()
                bound = config.timeout
                with anyio.fail_after(bound):
                    await self.channel.send(message)
            except TimeoutError:
                error = f"no answer within {bound:g} s"
            except Exception as exc:  # noqa: BLE001 - a broken channel is logged, never fatal
                error = scrub(f"{type(exc).__name__}: {exc}", config)
            else:
                self.sent += 1
                log.info("notify.sent", channel=name, alert=message.alert, status=message.status, key=message.key)
                return
            self.failed += 1
            self.last_error = error
            log.warning(
                "notify.send_failed", channel=name, alert=message.alert, key=message.key, attempt=attempt, error=error
            )
            if attempt < config.max_attempts:
                await anyio.sleep(config.delay(attempt))
        self.dropped += 1
        log.error(
            "notify.dropped",
            channel=name,
            alert=message.alert,
            status=message.status,
            key=message.key,
            summary=message.summary,
            attempts=config.max_attempts,
        )

    def counts(self) -> dict[str, Any]:
        """For ``/healthz``: what waits, what went, what failed or was given up, and the last error."""
        return {
            "queued": len(self.queue),
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "last_error": self.last_error,
        }
