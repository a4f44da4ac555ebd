import threading

import pytest

from worm_fast.files import atomic_write, atomic_write_text


def test_atomic_write_replaces_only_with_a_complete_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")

    def fail_halfway(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left


def test_concurrent_writers_never_collide(tmp_path):
    path = tmp_path / "table.md"
    errors = []

    def writer(text):
        try:
            for _ in range(50):
                atomic_write_text(path, text * 1000)
        except Exception as error:  # pragma: no cover - the failure being tested
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(c,)) for c in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert path.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
