import pytest

from fedpi.net.protocol import ProtocolMismatch, check_compatible


def test_same_major_is_compatible():
    check_compatible(coordinator="1.0", worker="1.3")


def test_major_mismatch_names_both_versions_and_what_to_upgrade():
    with pytest.raises(ProtocolMismatch) as err:
        check_compatible(coordinator="2.0", worker="1.0")
    message = str(err.value)
    assert "2.0" in message and "1.0" in message and "upgrade the worker" in message


def test_unreadable_version_is_refused():
    with pytest.raises(ProtocolMismatch, match="MAJOR.MINOR"):
        check_compatible(coordinator="banana", worker="1.0")
