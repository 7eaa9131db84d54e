"""Every backend and every test double has every member of the ``Captioner`` protocol, with its
signature: the daemon calls them all and probes for none (``getattr``)."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from phicapd.captioner import Captioner
from phicapd.model.captioner import Phi3VCaptioner
from phicapd.remote.captioner import RemoteCaptioner
from tests.support.fakes import FakeCaptioner, StreamingFakeCaptioner
from tests.systemd.stuck_daemon import HangingCaptioner

REPO = Path(__file__).resolve().parents[2]


def protocol_members() -> dict[str, Any]:
    """The protocol's own members: its methods and properties, by name."""
    return {name: value for name, value in vars(Captioner).items() if not name.startswith("_")}


def parameters(function: Any) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def violations(backend: Any) -> list[str]:
    """What ``backend`` (a class, or an instance whose attributes are set in ``__init__``) lacks or
    has with another shape than the protocol says."""
    cls = backend if isinstance(backend, type) else type(backend)
    found = []
    for name, member in protocol_members().items():
        if not hasattr(backend, name):
            found.append(f"{name}: missing")
        elif isinstance(member, property):
            if callable(getattr(cls, name, None)):
                found.append(f"{name}: a method where the protocol has a property")
        elif not inspect.isfunction(getattr(cls, name, None)):
            found.append(f"{name}: not a method")
        elif parameters(getattr(cls, name)) != parameters(member):
            found.append(f"{name}: parameters {parameters(getattr(cls, name))}, not {parameters(member)}")
    return found


def bench_captioner() -> Any:
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "bench" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FreeCaptioner()


def test_the_protocol_declares_what_the_daemon_calls() -> None:
    assert set(protocol_members()) == {
        "identity",
        "max_batch",
        "continuous_batching",
        "kept_image_side",
        "prepare",
        "stream",
        "caption",
        "warm_up",
        "describe",
        "waiting",
        "stopping",
        "close",
    }


@pytest.mark.parametrize("backend", [Phi3VCaptioner, RemoteCaptioner], ids=lambda c: c.__name__)
def test_each_backend_implements_the_whole_protocol(backend: type) -> None:
    assert violations(backend) == []


@pytest.mark.parametrize(
    "make",
    [
        FakeCaptioner,
        StreamingFakeCaptioner,
        lambda: HangingCaptioner(FakeCaptioner(), Path("/nonexistent/trigger")),
        bench_captioner,
    ],
    ids=["FakeCaptioner", "StreamingFakeCaptioner", "HangingCaptioner", "bench.FreeCaptioner"],
)
def test_each_double_implements_the_whole_protocol(make: Any) -> None:
    double = make()
    assert violations(double) == []
    assert isinstance(double, Captioner)


def test_a_double_with_a_member_missing_or_misshapen_is_caught() -> None:
    class Lacking(FakeCaptioner):
        def prepare(self, image: Any, crops: int) -> Any:  # type: ignore[override]
            return None

        stopping = None  # type: ignore[assignment]

    found = violations(Lacking())
    assert [v.split(":")[0] for v in found] == ["prepare", "stopping"]
    assert "crops" in found[0] and found[1] == "stopping: not a method"


def test_no_code_probes_a_captioner_for_a_member() -> None:
    probe = re.compile(r"getattr\(\s*[\w.]*captioner\b", re.IGNORECASE)
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted((REPO / "phicapd").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []
