"""A device whose state folder came from another machine (a cloned SD card) takes a new id.

A team sets up one Jetson, images its card and flashes four more: every copy holds the
first one's ``node_id``, and two devices under one id cannot see each other. The network
cards recorded beside the id tell a copy from the original; these tests give each
"machine" a folder laid out like ``/sys/class/net``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from p2ptrain.ring import claim_node_id, host_cards, load_or_create_node_id


def machine(root: Path, *macs: str, virtual: tuple[str, ...] = ("lo",)) -> Path:
    """A folder laid out like /sys/class/net: one physical card per MAC, plus virtual ones."""
    for i, mac in enumerate(macs):
        card = root / f"eth{i}"
        (card / "device").mkdir(parents=True)
        (card / "address").write_text(mac + "\n")
        (card / "addr_assign_type").write_text("0\n")  # burned in
    for name in virtual:  # no `device`: loopback, bridges, veth
        (root / name).mkdir(parents=True)
        (root / name / "address").write_text("00:00:00:00:00:00\n")
        (root / name / "addr_assign_type").write_text("0\n")
    return root


def test_the_cards_read_are_the_physical_ones(tmp_path: Path) -> None:
    net = machine(tmp_path / "net", "02:AB:00:00:00:01", "02:ab:00:00:00:02", virtual=("lo", "docker0"))
    (net / "docker0" / "address").write_text("02:42:ac:11:00:02\n")
    assert host_cards(net) == {"02:ab:00:00:00:01", "02:ab:00:00:00:02"}
    (net / "eth1" / "addr_assign_type").write_text("3\n")  # set by software (Wi-Fi randomisation, the image)
    assert host_cards(net) == {"02:ab:00:00:00:01"}
    assert host_cards(tmp_path / "no-such-folder") == set()


def test_a_copied_state_folder_takes_a_new_id_and_keeps_it(tmp_path: Path, caplog) -> None:
    first, second = machine(tmp_path / "a", "02:00:00:00:00:0a"), machine(tmp_path / "b", "02:00:00:00:00:0b")
    original = load_or_create_node_id(tmp_path / "state-a", sys_net=first)
    shutil.copytree(tmp_path / "state-a", tmp_path / "state-b")  # the SD card image
    with caplog.at_level(logging.WARNING, logger="p2ptrain.ring._identity"):
        copy = load_or_create_node_id(tmp_path / "state-b", sys_net=second)
    assert copy != original
    assert original in caplog.text and copy in caplog.text and "cloned" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p2ptrain.ring._identity"):
        assert load_or_create_node_id(tmp_path / "state-b", sys_net=second) == copy  # kept across restarts
        assert load_or_create_node_id(tmp_path / "state-a", sys_net=first) == original  # the original keeps its own
    assert caplog.text == ""
    assert (tmp_path / "state-b" / "node_id.host").read_text() == "02:00:00:00:00:0b\n"


def test_the_lock_path_takes_a_new_id_on_a_copy_too(tmp_path: Path) -> None:
    # What `p2ptrain join` and Node() call: the persisted id, under its lock.
    first, second = machine(tmp_path / "a", "02:00:00:00:00:0a"), machine(tmp_path / "b", "02:00:00:00:00:0b")
    a = claim_node_id(state_dir=tmp_path / "state-a", sys_net=first)
    a.release()
    shutil.copytree(tmp_path / "state-a", tmp_path / "state-b")
    b = claim_node_id(state_dir=tmp_path / "state-b", sys_net=second)
    b.release()
    assert a.persisted and b.persisted and a.node_id != b.node_id


def test_a_card_added_or_swapped_keeps_the_id(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_id = load_or_create_node_id(state, sys_net=machine(tmp_path / "1", "02:00:00:00:00:01"))
    # A USB Wi-Fi stick is plugged in; later the on-board card is replaced.
    assert load_or_create_node_id(state, sys_net=machine(tmp_path / "2", "02:00:00:00:00:01", "02:00:00:00:00:02")) == node_id
    assert load_or_create_node_id(state, sys_net=machine(tmp_path / "3", "02:00:00:00:00:02")) == node_id


def test_an_id_from_before_cards_were_recorded_is_adopted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "node_id").write_text("robot-7-0badc0de\n")  # written by an earlier p2ptrain
    net = machine(tmp_path / "net", "02:00:00:00:00:07")
    assert load_or_create_node_id(state, sys_net=net) == "robot-7-0badc0de"
    assert (state / "node_id.host").read_text() == "02:00:00:00:00:07\n"


def test_a_machine_without_readable_cards_keeps_its_id(tmp_path: Path) -> None:
    # Containers and network namespaces show only virtual interfaces: nothing to compare.
    state = tmp_path / "state"
    node_id = load_or_create_node_id(state, sys_net=machine(tmp_path / "a", "02:00:00:00:00:0a"))
    assert load_or_create_node_id(state, sys_net=machine(tmp_path / "c")) == node_id
    assert load_or_create_node_id(state, sys_net=tmp_path / "missing") == node_id


def test_a_state_folder_that_cannot_be_written_still_starts(tmp_path: Path, caplog) -> None:
    # The record of the cards is best effort; a copy whose new id cannot be kept runs
    # with it for this run and says so. (As root, chmod does not stop writes: a folder
    # where the temporary file goes does.)
    first, second = machine(tmp_path / "a", "02:00:00:00:00:0a"), machine(tmp_path / "b", "02:00:00:00:00:0b")
    state = tmp_path / "state"
    state.mkdir()
    (state / "node_id").write_text("robot-7-0badc0de\n")
    (state / "node_id.host.tmp").mkdir()
    assert load_or_create_node_id(state, sys_net=first) == "robot-7-0badc0de"
    assert not (state / "node_id.host").exists()
    (state / "node_id.host").write_bytes(b"02:00:00:00:00:0a\n")
    (state / "node_id.tmp").mkdir()
    with caplog.at_level(logging.WARNING, logger="p2ptrain.ring._identity"):
        fresh = load_or_create_node_id(state, sys_net=second)
    assert fresh != "robot-7-0badc0de" and "for this run only" in caplog.text
    assert (state / "node_id").read_text() == "robot-7-0badc0de\n"


def test_a_corrupt_record_of_the_cards_is_read_as_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_id = load_or_create_node_id(state, sys_net=machine(tmp_path / "a", "02:00:00:00:00:0a"))
    (state / "node_id.host").write_bytes(b"\xff\xfe\x00garbage")
    assert load_or_create_node_id(state, sys_net=machine(tmp_path / "b", "02:00:00:00:00:0b")) == node_id
