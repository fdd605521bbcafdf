"""The p2ptrain error tree.

Every error the library raises on purpose derives from :class:`P2PTrainError`, so
host software (a robot's supervisor) can catch one type. Third-party errors
(zmq, msgpack, zeroconf) are translated at the edge and chained with ``from``.

::

    P2PTrainError
    ├── ConfigError (ValueError)        bad argument, option or profile
    ├── CodecError (ValueError)         unknown codec, bad codec metadata
    ├── TransportError (OSError)        socket could not bind/connect/send
    │   └── ProtocolError (ValueError)  a frame broke the wire rules (counted, dropped)
    ├── DiscoveryError (OSError)        mDNS could not announce or browse
    ├── AdmissionError (PermissionError) a peer could not prove the cluster secret
    ├── MembershipError                 ring/view problems
    │   ├── QuorumLostError             this side holds less than a majority: paused
    │   └── LeftOutError                the ring went on without this member
    ├── PeerFailedError                 a peer died mid-operation (never a hang)
    ├── PlanError (ValueError)          no plan fits the devices
    └── JobError                        a job could not be accepted or run
"""

from __future__ import annotations

__all__ = [
    "AdmissionError",
    "CodecError",
    "ConfigError",
    "DiscoveryError",
    "JobError",
    "JobStopped",
    "LeftOutError",
    "MembershipError",
    "P2PTrainError",
    "PeerFailedError",
    "PlanError",
    "ProtocolError",
    "QuorumLostError",
    "TransportError",
    "trace_unless_ours",
    "worth_logging",
]


class P2PTrainError(Exception):
    """Base of every error p2ptrain raises on purpose."""


class ConfigError(P2PTrainError, ValueError):
    """An argument, option or profile is invalid; the message says how to fix it."""


class CodecError(P2PTrainError, ValueError):
    """Unknown codec name, or codec metadata that does not describe its buffers."""


class TransportError(P2PTrainError, OSError):
    """A socket could not bind, connect or send."""


class ProtocolError(P2PTrainError, ValueError):
    """An inbound message broke the wire rules; it is dropped and counted."""


class DiscoveryError(P2PTrainError, OSError):
    """mDNS could not announce or browse on the chosen interfaces."""


class AdmissionError(P2PTrainError, PermissionError):
    """A peer could not prove the cluster secret, or a non-loopback peer came without one."""


class MembershipError(P2PTrainError):
    """The ring or its views are in a state the operation cannot use."""


class QuorumLostError(MembershipError):
    """This side holds less than a majority of the previous view and has paused.

    Attributes:
        step: when it stopped a job, the first step not applied here (else None).
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class LeftOutError(MembershipError):
    """The others installed a view without this member while it was silent (frozen, suspended, cut off).

    It took part in a job's view, went quiet for longer than the failure timeout, and the
    others went on without it: what it holds of the job is stale. It stops its part; the
    job invites it back as a newcomer once it is in the ring again.
    """


class PeerFailedError(P2PTrainError):
    """A peer failed while an operation depended on it."""


class PlanError(P2PTrainError, ValueError):
    """No plan fits the devices and the model."""


class JobError(P2PTrainError):
    """A job could not be accepted or run."""


class MemberLostError(JobError):
    """A job cannot go on without what a member that left or failed held (its split weights, its stages).

    Every survivor sees the same loss in its own view and says so itself: this is never
    relayed as "member X failed", which would name the survivor that noticed first.
    """


class JobStopped(JobError):
    """This member stopped its job on purpose (:meth:`~p2ptrain.JobService.stop`); the others stop too.

    Attributes:
        reason: why, in words.
        step: the first step not applied here (the model holds the steps before it).
        agreed: every member stopped at this step by itself (a pipeline's stop travels in its steps'
            sums): nobody needs telling, and telling would cut short the submitter's gather of the model.
    """

    def __init__(self, reason: str, step: int, *, agreed: bool = False) -> None:
        super().__init__(f"{reason} at step {step}")
        self.reason, self.step, self.agreed = reason, step, agreed


def trace_unless_ours(exc: BaseException) -> BaseException | None:
    """``exc`` as a log call's ``exc_info``, or None for one of ours (its message says it all).

    A job's failure is logged in a line when it is a :class:`~p2ptrain.P2PTrainError`;
    anything else (the host's hook, the workload, a bug) gets its traceback.
    """
    return None if isinstance(exc, P2PTrainError) else exc


def worth_logging(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th... occurrence of a fault: a lasting one is reported, never floods the log."""
    return count & (count - 1) == 0
