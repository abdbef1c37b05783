"""Direct failure and recovery notifications (webhook, e-mail) for sites without Alertmanager:
the ``[notify]`` config, the policy of what to send, the message, its channels and delivery.
"""

from collector.report.notify.channels import (
    Channel,
    DeliveryError,
    EmailChannel,
    WebhookChannel,
    channels_from_config,
)
from collector.report.notify.config import (
    EmailConfig,
    NotifyConfig,
    WebhookConfig,
    parse_notify_config,
)
from collector.report.notify.delivery import Notifier
from collector.report.notify.message import Event, EventKind, Notification
from collector.report.notify.policy import NotifyPolicy

__all__ = [
    "Channel",
    "DeliveryError",
    "EmailChannel",
    "EmailConfig",
    "Event",
    "EventKind",
    "Notification",
    "Notifier",
    "NotifyConfig",
    "NotifyPolicy",
    "WebhookChannel",
    "WebhookConfig",
    "channels_from_config",
    "parse_notify_config",
]
