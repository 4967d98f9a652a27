"""The config parser's tools: a table reader that records every problem with its key path, and converters.

A converter turns one TOML value into a typed value or raises Invalid("what is wrong"); Table.get records
"key.path: what is wrong" and goes on, so every problem of a file is reported at once.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

import dns.exception
import dns.name

from healthchecks.base import IPAddress  # defined once, in the lower layer (healthchecks imports no edge_lb)

Kwargs = dict[str, Any]
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_ARRAY_INDEX = re.compile(r"\[\d+\]")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class Invalid(Exception):
    """A converter's verdict on one value: the message after "key.path: "."""


class Table:
    """One TOML table being read: hands out converted values, records a problem for each bad one."""

    def __init__(self, data: object, path: str, problems: list[str], keys: tuple[str, ...]) -> None:
        self.path = path
        self.problems = problems
        self.is_table = isinstance(data, Mapping)  # when not, its one problem is that, not missing keys
        self.data: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
        if not self.is_table:
            problems.append(f"{path}: must be a table")
        for key in self.data:
            if key not in keys:
                self.problem(key, "unknown key")

    def key_path(self, key: str) -> str:
        """The dotted path of `key` in this table; "" is the table itself."""
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.key_path(key)}: {message}")

    def get(self, key: str, convert: Callable[[Any], Any], *, required: bool = False) -> Any:
        """The converted value of `key`, or None when it is absent or invalid (invalid records a problem)."""
        if key not in self.data:
            if required and self.is_table:
                self.problem(key, "required")
            return None
        try:
            return convert(self.data[key])
        except Invalid as exc:
            self.problem(key, str(exc))
            return None

    def values(
        self, converters: Mapping[str, Callable[[Any], Any]], required: tuple[str, ...] = ()
    ) -> Kwargs:
        """Every present, valid key of `converters`: keyword arguments for a dataclass with defaults."""
        values = {
            key: self.get(key, convert, required=key in required) for key, convert in converters.items()
        }
        return {key: value for key, value in values.items() if value is not None}

    def table(self, key: str, keys: tuple[str, ...]) -> Table:
        """A sub-table allowed to hold `keys`; absent is empty."""
        return Table(self.data.get(key, {}), self.key_path(key), self.problems, keys)

    def array(self, key: str, keys: tuple[str, ...]) -> list[Table]:
        """An array of tables (`[[key]]`), each allowed to hold `keys`; absent is empty."""
        value = self.data.get(key, [])
        if not isinstance(value, list):
            header = _ARRAY_INDEX.sub("", self.key_path(key))
            self.problem(key, f"must be an array of tables ([[{header}]])")
            return []
        items = [(f"{self.key_path(key)}[{index}]", item) for index, item in enumerate(value)]
        return [Table(item, path, self.problems, keys) for path, item in items]


def integer(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid(f"must be an integer {low}..{high}")
        return value

    return convert


def mark_base(value: Any) -> int:
    """[dataplane] check_mark_base: a socket mark whose low 20 bits are 0 (they carry a backend index)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFF00000 or value % 2**20:
        raise Invalid("must be a multiple of 0x100000 (1048576) in 0x100000..0xFFF00000: the low 20 bits "
                      "carry the backend's index")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("must be a string")
    return value


def choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise Invalid("must be " + " or ".join(f'"{choice}"' for choice in choices))
        return str(value)

    return convert


def pattern(pattern: re.Pattern[str], want: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise Invalid(f"must match {want}")
        return value

    return convert


def mac(value: Any) -> str:
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        raise Invalid("not a MAC address (want aa:bb:cc:dd:ee:ff)")
    if int(value[:2], 16) & 1:
        raise Invalid(f"{value} is a multicast MAC address (want a unicast one)")
    return value.lower()


def address(value: Any) -> IPAddress:
    """A unicast IP address a VIP or backend can have."""
    try:
        address = ipaddress.ip_address(string(value))
    except (Invalid, ValueError):
        raise Invalid("not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise Invalid(f"{value} has a zone (%{address.scope_id}): not allowed")
    for bad, what in (
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "the unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address == _BROADCAST, "the broadcast address"),
    ):
        if bad:
            raise Invalid(f"{address} is {what}")
    return address


def network(version: int, low: int, high: int, example: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        try:
            network = ipaddress.ip_network(string(value))
        except (Invalid, ValueError):
            raise Invalid(f"not an IPv{version} prefix without host bits, like {example}") from None
        if network.version != version or not low <= network.prefixlen <= high:
            raise Invalid(f"must be an IPv{version} prefix of length {low}..{high}")
        return network

    return convert


def number(low: float, high: float, what: str = "a number of seconds") -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise Invalid(f"must be {what} {low:g}..{high:g}")
        return float(value)

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def text(value: Any) -> str:
    """A string that cannot smuggle a line break or control character into a request or a log line."""
    if not isinstance(value, str) or not value.isprintable():
        raise Invalid("must be a string of printable characters")
    return value


def dns_name(value: Any) -> str:
    try:
        dns.name.from_text(text(value))
    except (Invalid, dns.exception.DNSException) as exc:
        raise Invalid(f"not a DNS name: {exc}") from None
    return str(value)


def file_path(value: Any) -> str:
    text = string(value)
    if not text.startswith("/") or not text.isprintable() or text.endswith("/"):
        raise Invalid("must be an absolute path to a file")
    return text


def url_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not value.isprintable() or " " in value:
        raise Invalid("must be a URL path starting with '/', without spaces or control characters")
    return value


def statuses(value: Any) -> tuple[int, ...]:
    codes = value if isinstance(value, list) else [value]
    if not codes or any(isinstance(c, bool) or not isinstance(c, int) or not 100 <= c <= 599 for c in codes):
        raise Invalid("must be an HTTP status code 100..599 or a non-empty list of them")
    return tuple(codes)


def argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise Invalid('must be a non-empty list of non-empty strings, like ["/usr/bin/check", "{address}"]')
    if not value[0].startswith("/"):
        raise Invalid(f"{value[0]!r}: the program must be an absolute path (no shell, no PATH search)")
    return tuple(value)
