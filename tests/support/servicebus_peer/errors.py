"""The peer's error vocabulary: one exception per condition Service Bus reports.

The broker raises these; the AMQP side turns each into the wire form the SDK expects:
a link detach or delivery rejection carries `condition` and the description, a
`$management` response carries `status` as `statusCode` and `condition` as
`errorCondition`. Keeping condition and status on the class means the two wire forms
can never disagree about what an error is.
"""

from __future__ import annotations

from typing import ClassVar


class PeerError(Exception):
    """Base class: an error the peer reports to a client, never a crash of the peer."""

    condition: ClassVar[str] = "amqp:internal-error"
    status: ClassVar[int] = 500

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class EntityNotFound(PeerError):
    condition = "amqp:not-found"
    status = 404


class MessageNotFound(PeerError):
    condition = "com.microsoft:message-not-found"
    status = 404


class MessageLockLost(PeerError):
    condition = "com.microsoft:message-lock-lost"
    status = 410


class SessionLockLost(PeerError):
    condition = "com.microsoft:session-lock-lost"
    status = 410


class SessionCannotBeLocked(PeerError):
    condition = "com.microsoft:session-cannot-be-locked"
    status = 409


class NotAllowed(PeerError):
    condition = "amqp:not-allowed"
    status = 400


class ArgumentError(PeerError):
    condition = "com.microsoft:argument-error"
    status = 400


class MessageTooLarge(PeerError):
    condition = "amqp:link:message-size-exceeded"
    status = 413


class DecodeError(PeerError):
    condition = "amqp:decode-error"
    status = 400


class NotImplementedByPeer(PeerError):
    condition = "amqp:not-implemented"
    status = 501
