"""The session-hash bindings themselves (the middleware is exercised over HTTP in test_app_browser)."""

from labeling.app.session_guard import SessionOwners


def test_a_session_hash_belongs_to_its_first_user_and_old_bindings_are_forgotten_first():
    owners = SessionOwners(limit=2)
    assert owners.claim("s1", "bob") and owners.claim("s1", "bob")
    assert not owners.claim("s1", "eve")
    assert owners.claim("s2", "eve")
    assert owners.claim("s1", "bob")  # used again: now the most recent binding
    assert owners.claim("s3", "carol")  # over the limit: s2, the least recently used, goes
    assert not owners.claim("s1", "eve")  # s1 is still bob's
    assert owners.claim("s2", "bob")  # s2 was forgotten: anyone's to claim again
