"""Small value types shared by the core and plugins: customer claims and records, routing
decisions."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class CustomerClaim:
    """What a sender stated about themselves alongside a customer number."""

    customer_number: str
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    street: str | None = None
    postcode: str | None = None
    city: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Customer:
    """A confirmed customer record from the directory or a CRM."""

    customer_number: str
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    source: str = "directory"


@dataclasses.dataclass(frozen=True, slots=True)
class RoutingDecision:
    """The responsible unit for a conversation, the rule that chose it and why, for staff."""

    unit: str
    rule: str
    reason: str
