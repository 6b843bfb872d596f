"""The prefill worker's shipping thread (prefill.shipping.Shipper), with a fake ship
function: it runs beside the caller, keeps order, bounds what is in hand, survives a
failing batch and finishes its queue on close."""

from __future__ import annotations

import threading

import pytest

from tandem.prefill.shipping import Shipper


def test_batches_ship_on_their_own_thread_while_the_caller_goes_on():
    gate = threading.Event()
    shipped_on: list[str] = []

    def ship(flights: list[str]) -> list[tuple[str, str]]:
        gate.wait(5)
        shipped_on.append(threading.current_thread().name)
        return [(f, "") for f in flights]

    shipper: Shipper[str] = Shipper(ship, max_batches=2)
    shipper.submit(["a", "b"])
    assert not shipper.full and (shipper.batches, shipper.flights) == (1, 2)
    shipper.submit(["c"])
    assert shipper.full and (shipper.batches, shipper.flights) == (2, 3)
    # Nothing is done while the transfer is held up; the caller is not blocked.
    assert shipper.collect() == [] and shipper.collect(0.05) == []
    gate.set()
    outcomes = shipper.collect(5)
    while len(outcomes) < 3:
        outcomes += shipper.collect(5)
    assert outcomes == [("a", ""), ("b", ""), ("c", "")]
    assert (shipper.batches, shipper.flights, shipper.full) == (0, 0, False)
    assert shipped_on == ["prefill-shipper", "prefill-shipper"]
    shipper.close(5)


def test_a_failing_batch_fails_its_flights_and_the_next_one_still_ships():
    def ship(flights: list[str]) -> list[tuple[str, str]]:
        if "bad" in flights:
            raise RuntimeError("boom")
        return [(f, "refused" if f == "late" else "") for f in flights]

    shipper: Shipper[str] = Shipper(ship)
    shipper.submit(["bad", "x"])
    shipper.submit(["y", "late"])
    shipper.close(5)  # finishes both batches first
    assert shipper.collect() == [
        ("bad", "shipping failed: boom"),
        ("x", "shipping failed: boom"),
        ("y", ""),
        ("late", "refused"),
    ]
    assert shipper.batches == 0


def test_shipper_needs_room_for_a_batch():
    with pytest.raises(ValueError):
        Shipper(lambda flights: [], max_batches=0)
